"""The engine: the mode table, input validation, loading, batching, decoding, images, the safety checker, the fast
path, device memory."""
