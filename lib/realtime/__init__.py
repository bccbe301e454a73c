"""The realtime server: images as you type and live img2img painting, on the engine in this process.

  scripts/realtime.sh [--host 127.0.0.1] [--port 7860] [--tiny]     then open http://127.0.0.1:7860/

protocol.py: the WebSocket messages and their checks; session.py: one page's connection (latest wins);
server.py: the Starlette app (the page, the socket, the handshake checks); cli.py: the entry point.
"""
