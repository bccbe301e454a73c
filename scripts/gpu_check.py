"""The GPU check, one prepared run; scripts/gpu_check.sh is the command (lib/bench/gpu_check.py)."""

import os
import sys

from lib.bench.gpu_check import main

if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: a step stopped at its cap may have left a warm-up or compile running in a worker thread, which
    # the interpreter would wait for. Every result is written by now.
    os._exit(code)
