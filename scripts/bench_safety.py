"""The safety checker on decoded pixels on the device, against diffusers' PIL way (lib/bench/safety.py)."""

import sys

from lib.bench.safety import main

if __name__ == "__main__":
    sys.exit(main())
