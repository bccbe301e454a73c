"""Throughput of concurrent predictions with batching, against sequential (lib/bench/throughput.py)."""

import sys

from lib.bench.throughput import main

if __name__ == "__main__":
    sys.exit(main())
