"""The GPU check, one prepared run; scripts/gpu_check.sh is the command (lib/bench/gpu_check.py)."""

import sys

from lib.bench.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
