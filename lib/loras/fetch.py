"""Downloading a style LoRA from a user's URL without letting the URL reach anything it should not (see the
package docstring): https only, every address checked, at most LORA_MAX_BYTES, safetensors checked as it
arrives (lib/loras/check.py)."""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from lib.atomic import replacing
from lib.engine.inputs import InputError
from lib.loras.check import check_header, not_safetensors
from lib.settings import Settings

MAX_REDIRECTS = 5
CONNECT_TIMEOUT, READ_TIMEOUT = 10, 60
CHUNK = 1 << 20
# Cloud metadata services outside the private ranges (which are refused anyway): Azure's wire server.
METADATA_ADDRESSES = {
    ipaddress.ip_address(a) for a in ("168.63.129.16", "169.254.169.254", "fd00:ec2::254", "100.100.100.200")
}


def shown(url: str) -> str:
    """The URL for messages and logs, without its query or credentials (signed URLs carry tokens there)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return repr(url[:100])
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path[:200]}" + ("?..." if parts.query else "")


# -- where a URL may lead ---------------------------------------------------------------------------------------
def refused_address(address: str) -> str | None:
    """Why a resolved address may not be fetched from (None: a public address)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            ip = embedded
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for kind in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    if not ip.is_global:
        return "not a public address"
    return None


def check_url(url: str):
    """The URL's parts, if its form is allowed: https (or http with LORA_ALLOW_HTTP=1), a host, no credentials.
    A literal IP address is checked here too; host names are checked when they are resolved."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise InputError(f"lora_url: {shown(url)} is not a valid URL ({e})") from None
    if parts.scheme not in ("https", "http"):
        raise InputError(f"lora_url: {shown(url)} is not an https URL; allowed: https://...")
    if parts.scheme == "http" and not Settings().lora_allow_http:
        raise InputError(f"lora_url: {shown(url)} uses http; only https URLs are allowed")
    if not parts.hostname:
        raise InputError(f"lora_url: {shown(url)} has no host")
    if parts.username is not None or parts.password is not None:
        raise InputError(f"lora_url: {shown(url)} carries credentials (user:password@); they are not allowed")
    try:
        literal = ipaddress.ip_address(parts.hostname)
    except ValueError:
        literal = None
    if literal is not None and not Settings().lora_allow_http and (why := refused_address(str(literal))):
        raise InputError(f"lora_url: {shown(url)} points to {why}; only public addresses are allowed")
    if port is not None and not 0 < port < 65536:
        raise InputError(f"lora_url: {shown(url)} has an invalid port")
    return parts


def resolve(host: str, port: int) -> list[tuple[int, tuple]]:
    """(family, sockaddr) for every address of `host`, all of them checked: one refused address refuses the
    host (a name that also resolves inward is not fetched from)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not Settings().lora_allow_http:
        for _, _, _, _, sockaddr in infos:
            if why := refused_address(sockaddr[0]):
                raise InputError(
                    f"lora_url: host {host} resolves to {sockaddr[0]}, {why}; only public addresses are allowed"
                )
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


def _guarded_connection(base):
    """A urllib3 connection class that resolves and checks the host itself and connects to the checked address
    (TLS still verifies the certificate against the host name)."""
    from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
    from urllib3.util import connection

    class Guarded(base):
        def _new_conn(self):
            try:
                addresses = resolve(self._dns_host, self.port)
            except socket.gaierror as e:
                raise NameResolutionError(self.host, self, e) from e
            error: Exception | None = None
            for _, sockaddr in addresses:
                try:
                    return connection.create_connection(
                        sockaddr[:2],
                        self.timeout,
                        source_address=self.source_address,
                        socket_options=self.socket_options,
                    )
                except socket.timeout as e:
                    error = ConnectTimeoutError(self, f"Connection to {self.host} timed out")
                    error.__cause__ = e
                except OSError as e:
                    error = NewConnectionError(self, f"Failed to establish a new connection: {e}")
            raise error or NewConnectionError(self, f"no address for {self.host}")

    return Guarded


def _session():
    import requests
    import urllib3

    class Adapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            pools = {}
            for scheme, pool in (("http", urllib3.HTTPConnectionPool), ("https", urllib3.HTTPSConnectionPool)):
                pools[scheme] = type(
                    f"Guarded{pool.__name__}", (pool,), {"ConnectionCls": _guarded_connection(pool.ConnectionCls)}
                )
            self.poolmanager.pool_classes_by_scheme = pools

    session = requests.Session()
    session.trust_env = False  # no proxies or .netrc from the environment: the checks are about this host
    for prefix in ("http://", "https://"):
        session.mount(prefix, Adapter(max_retries=0))
    session.headers.update({"User-Agent": "fast-sd-lora-fetch", "Accept-Encoding": "identity"})
    return session


def download(url: str, path: Path) -> None:
    import requests

    settings = Settings()
    limit, deadline = settings.lora_max_bytes, time.monotonic() + settings.lora_download_timeout
    session = _session()
    try:
        response = None
        for _ in range(MAX_REDIRECTS + 1):
            check_url(url)
            response = session.get(url, stream=True, allow_redirects=False, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
            if response.status_code in (301, 302, 303, 307, 308) and response.headers.get("Location"):
                url = urljoin(url, response.headers["Location"])
                response.close()
                continue
            break
        else:
            raise InputError(f"lora_url: more than {MAX_REDIRECTS} redirects")
        with response:
            if response.status_code != 200:
                raise InputError(
                    f"lora_url: {shown(url)} answered HTTP {response.status_code}; expected 200 and the file"
                )
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > limit:
                raise InputError(
                    f"lora_url: the file is {int(length) / 1e6:.1f} MB; allowed: up to {limit / 1e6:.1f} "
                    "MB (LORA_MAX_BYTES)"
                )
            with replacing(path, suffix=".part") as tmp:  # the cache sweeps leftover .*.part files
                _stream(response, tmp, limit, deadline)
    except requests.RequestException as e:
        raise InputError(f"lora_url: could not download {shown(url)}: {_reason(e)}") from None
    finally:
        session.close()


def _stream(response, tmp: Path, limit: int, deadline: float) -> None:
    received, prefix, total = 0, b"", None
    with open(tmp, "wb") as out:
        for chunk in response.iter_content(CHUNK):
            received += len(chunk)
            if received > limit:
                raise InputError(f"lora_url: the file is larger than {limit / 1e6:.1f} MB (LORA_MAX_BYTES)")
            if total is None:  # the header decides before any more is downloaded
                prefix += chunk
                if (result := check_header(prefix)) is not None:
                    total = result[1]
                    if total > limit:
                        raise InputError(
                            f"lora_url: the file is {total / 1e6:.1f} MB; allowed: up to "
                            f"{limit / 1e6:.1f} MB (LORA_MAX_BYTES)"
                        )
                    prefix = b""
            if total is not None and received > total:
                raise InputError("lora_url: the file is longer than its safetensors header says")
            out.write(chunk)
            if time.monotonic() > deadline:
                raise InputError("lora_url: the download took too long (LORA_DOWNLOAD_TIMEOUT)")
        if total is None:
            raise InputError(
                not_safetensors(prefix)
                if len(prefix) >= 8
                else "lora_url: the file is too short to be a safetensors file"
            )
        if received != total:
            raise InputError(f"lora_url: the download ended after {received} of {total} bytes")
        out.flush()
        os.fsync(out.fileno())


def _reason(e: BaseException) -> str:
    """The innermost cause of a requests error, short."""
    for _ in range(10):
        inner = getattr(e, "reason", None) or e.__cause__ or (e.args[0] if e.args else None)
        if not isinstance(inner, BaseException):
            break
        e = inner
    return str(e)[:300] or type(e).__name__
