"""What api.replicate.com answers, for the loopback stand-ins of the tests (the jobs runner, the push script's smoke
prediction): the objects the `replicate` client reads."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler


def model(owner: str, name: str, version: str) -> dict:
    """GET /v1/models/{owner}/{name}: a private model whose latest version is `version`."""
    return {
        "url": f"https://replicate.com/{owner}/{name}",
        "owner": owner,
        "name": name,
        "description": None,
        "visibility": "private",
        "github_url": None,
        "paper_url": None,
        "license_url": None,
        "run_count": 0,
        "cover_image_url": None,
        "default_example": None,
        "latest_version": {
            "id": version,
            "created_at": "2026-11-22T00:00:00Z",
            "cog_version": "0.23.1",
            "openapi_schema": {},
        },
    }


def send(handler: BaseHTTPRequestHandler, code: int, data: bytes, content_type: str) -> None:
    handler.send_response(code)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def send_json(handler: BaseHTTPRequestHandler, code: int, obj) -> None:
    send(handler, code, json.dumps(obj).encode(), "application/json")
