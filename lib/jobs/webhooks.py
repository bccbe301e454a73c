"""Who may post webhooks to the job receiver: Replicate's signed webhooks, or a Cog server's bearer token.

Replicate signs every webhook (the Standard Webhooks scheme): headers `webhook-id`, `webhook-timestamp`
(Unix seconds) and `webhook-signature`, a space-separated list of `v1,<base64 HMAC-SHA256>` entries over
`{webhook-id}.{webhook-timestamp}.{body}`, keyed with the base64-decoded part of the `whsec_...` signing
secret (GET https://api.replicate.com/v1/webhooks/default/secret). A Cog server started with
WEBHOOK_AUTH_TOKEN sends `Authorization: Bearer <token>` instead.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time

DEFAULT_TOLERANCE = 300  # seconds a signed webhook's timestamp may differ from our clock (Standard Webhooks)


class AuthError(Exception):
    """The request is not from who it claims to be (or is too old): answer 401 and store nothing."""


def decode_secret(secret: str) -> bytes:
    prefix, _, key = secret.strip().partition("_")
    if prefix != "whsec" or not key:
        raise ValueError("the webhook signing secret must look like whsec_<base64>")
    try:  # padding optional, as the Standard Webhooks reference library takes it
        return base64.b64decode(key + "=" * (-len(key) % 4), validate=True)
    except binascii.Error:
        raise ValueError("the webhook signing secret's part after whsec_ is not base64") from None


def _mac(secret: str, webhook_id: str, timestamp: int | str, body: bytes) -> bytes:
    """The Standard Webhooks HMAC-SHA256 of `{id}.{timestamp}.{body}`."""
    return hmac.new(decode_secret(secret), f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()


def sign(secret: str, webhook_id: str, timestamp: int | str, body: bytes) -> str:
    """The `webhook-signature` value Replicate would send for this message."""
    return "v1," + base64.b64encode(_mac(secret, webhook_id, timestamp, body)).decode()


def signed_headers(secret: str, body: bytes, webhook_id: str | None = None, timestamp: int | None = None) -> dict:
    webhook_id = webhook_id or f"msg_{secrets.token_hex(12)}"
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, webhook_id, timestamp, body),
    }


def verify_signature(
    headers, body: bytes, secret: str, tolerance: float = DEFAULT_TOLERANCE, now: float | None = None
) -> str:
    """Check a Replicate webhook; returns its webhook-id. Raises AuthError."""
    webhook_id, timestamp, signature = (
        headers.get(h) for h in ("webhook-id", "webhook-timestamp", "webhook-signature")
    )
    if not (webhook_id and timestamp and signature):
        raise AuthError("missing webhook-id, webhook-timestamp or webhook-signature header")
    try:
        sent = int(timestamp)
    except ValueError:
        raise AuthError(f"webhook-timestamp {timestamp!r} is not Unix seconds") from None
    now = time.time() if now is None else now
    if abs(now - sent) > tolerance:
        raise AuthError(f"webhook-timestamp is {now - sent:+.0f} s from now; allowed: within {tolerance:g} s")
    expected = _mac(secret, webhook_id, timestamp, body)
    for entry in signature.split():
        version, _, value = entry.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(value, validate=True)
        except binascii.Error:
            continue
        if hmac.compare_digest(given, expected):
            return webhook_id
    raise AuthError("no valid v1 signature for this body")


def verify_bearer(headers, token: str) -> None:
    given = (headers.get("authorization") or "").encode()
    if not hmac.compare_digest(given, f"Bearer {token}".encode()):
        raise AuthError("missing or wrong bearer token")


class Authenticator:
    """Accepts signed (Replicate) webhooks when given a secret, bearer-token (Cog) ones when given a token."""

    def __init__(self, secret: str | None = None, token: str | None = None, tolerance: float = DEFAULT_TOLERANCE):
        if not (secret or token):
            raise ValueError(
                "the receiver needs a webhook signing secret (REPLICATE_WEBHOOK_SECRET) or a "
                "bearer token (WEBHOOK_AUTH_TOKEN): it never accepts unauthenticated webhooks"
            )
        if secret:
            decode_secret(secret)
        self.secret, self.token, self.tolerance = secret, token, tolerance

    def check(self, headers, body: bytes) -> str:
        """Returns the message's dedup key: its webhook-id, or the body's sha256 for a Cog server (which sends
        no id). `headers` is anything with a case-insensitive .get (http.server's headers are)."""
        if headers.get("webhook-signature") is not None:
            if not self.secret:
                raise AuthError("signed webhooks are not accepted here (no signing secret configured)")
            return "id:" + verify_signature(headers, body, self.secret, self.tolerance)
        if self.token and headers.get("authorization") is not None:
            verify_bearer(headers, self.token)
            return "sha256:" + hashlib.sha256(body).hexdigest()
        raise AuthError("no webhook signature or bearer token")
