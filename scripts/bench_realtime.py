"""The realtime server's frames per second and latency against the engine called directly (lib/bench/realtime.py)."""

import sys

from lib.bench.realtime import main

if __name__ == "__main__":
    sys.exit(main())
