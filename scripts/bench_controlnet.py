"""The cost of one and two ControlNets per denoising step against none (lib/bench/controlnet.py)."""

import sys

from lib.bench.controlnet import main

if __name__ == "__main__":
    sys.exit(main())
