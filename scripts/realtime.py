"""The realtime server (lib/realtime): images as you type and live img2img painting, in the browser.

python scripts/realtime.py [--host 127.0.0.1] [--port 7860] [--tiny]    (scripts/realtime.sh sets up .venv first)
"""

import sys

from lib.realtime.cli import main

if __name__ == "__main__":
    sys.exit(main())
