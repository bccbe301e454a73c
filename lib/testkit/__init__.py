"""Synthetic models (tiny and full size) and test servers (nginx, a fault proxy, a Hub stand-in, the Cog server), for
tests, scripts and benchmarks."""
