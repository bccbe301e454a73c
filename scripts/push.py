"""Push the model to Replicate (lib/push.py; docs/serving.md)."""

import sys

from lib.push import main

if __name__ == "__main__":
    sys.exit(main())
