"""Download benchmark: the downloader against curl, the warm check against from_pretrained (lib/bench/download.py)."""

import sys

from lib.bench.download import main

if __name__ == "__main__":
    sys.exit(main())
