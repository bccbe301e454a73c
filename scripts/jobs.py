"""Batches of async predictions with webhooks (lib/jobs/cli.py; docs/serving.md)."""

import sys

from lib.jobs.cli import main

if __name__ == "__main__":
    sys.exit(main())
