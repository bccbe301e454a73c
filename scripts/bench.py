"""The speed benchmark on full-size models, and its other runs (lib/bench/; docs/benchmarks.md)."""

import sys

from lib.bench.suite import main

if __name__ == "__main__":
    sys.exit(main())
