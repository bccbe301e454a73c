"""Operator commands for the weights cache (lib/weights/cli.py; docs/weights.md)."""

import sys

from lib.weights.cli import main

if __name__ == "__main__":
    sys.exit(main())
