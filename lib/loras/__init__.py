"""Style LoRAs: a user's LoRA file, fetched safely into a disk cache, applied to a mode's pipeline for one batch
and removed after it, whatever happens.

Fetching (`fetch`, called by Engine.job: network work belongs to the request, before batching)
- https only. Every connection (the first and each redirect hop, followed here by hand, at most 5) resolves
  the host itself, refuses it if any address is loopback, private, link-local, shared, reserved, multicast or
  a cloud metadata address, and connects to the address it checked (no second lookup to rebind). Proxies from
  the environment are not used. LORA_ALLOW_HTTP=1 allows http and every address: for tests only.
- At most LORA_MAX_BYTES (default 1 GiB), checked on Content-Length, on the size the file's header declares,
  and while streaming; LORA_DOWNLOAD_TIMEOUT seconds (default 600) in all.
- safetensors only: the 8-byte little-endian header length and the JSON header are checked as soon as they
  arrive (dtypes, shapes, contiguous offsets that end exactly at the file's end). Anything else (a pickle or
  zip .pt/.ckpt/.bin, an HTML page) is refused there, and nothing but safetensors is ever deserialized.
- Cache: LORA_CACHE_DIR (default WEIGHTS_DIR/.loras), one file per URL named by the URL's sha256, written
  atomically; least-recently-used files are evicted to keep the folder under LORA_CACHE_BYTES (default 5 GiB).
  The same URL is not fetched again (a changed file needs a new URL). A fetched LoRA is held open by its job,
  so eviction cannot pull it from under a queued request.

Applying (`style_lora`, around the batch's pipeline call)
- Loaded as the peft adapter "style" at `lora_scale` into the UNet and, where the file has them, the text
  encoders (kohya `lora_unet_`/`lora_te_`/`lora_te1_`/`lora_te2_` keys or the diffusers/peft `unet.`/
  `text_encoder.` layout). In the LCM-LoRA modes the LCM-LoRA is already fused into the UNet's base weights
  (lib/engine/loading.fuse_lora): the style adapter adds on top, the same as two adapters with LCM's at 1.0.
- Checked: every layer of the file must land in the model with its shape; otherwise the request fails with
  an InputError naming the mismatch (layers not in the model, other shapes, the cross-attention widths).
- Always removed on exit (success, error, cancel): unload_lora_weights() puts the original layers back
  (exact; the fused LCM weights live in those layers and stay), fused QKV attention is restored, and the
  model is checked to hold no adapter layer.
"""
