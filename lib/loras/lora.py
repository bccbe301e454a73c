"""Style LoRAs: a user's LoRA file, fetched safely into a disk cache, applied to a mode's pipeline for one batch
and removed after it, whatever happens.

Fetching (`fetch`, called by Engine.job: network work belongs to the request, before batching)
- https only. Every connection (the first and each redirect hop, followed here by hand, at most 5) resolves
  the host itself, refuses it if any address is loopback, private, link-local, shared, reserved, multicast or
  a cloud metadata address, and connects to the address it checked (no second lookup to rebind). Proxies from
  the environment are not used. LORA_ALLOW_HTTP=1 allows http and every address: for tests only.
- At most LORA_MAX_BYTES (default 1 GiB), checked on Content-Length, on the size the file's header declares,
  and while streaming; LORA_DOWNLOAD_TIMEOUT seconds (default 600) in all.
- safetensors only: the 8-byte little-endian header length and the JSON header are checked as soon as they
  arrive (dtypes, shapes, contiguous offsets that end exactly at the file's end). Anything else (a pickle or
  zip .pt/.ckpt/.bin, an HTML page) is refused there, and nothing but safetensors is ever deserialized.
- Cache: LORA_CACHE_DIR (default WEIGHTS_DIR/.loras), one file per URL named by the URL's sha256, written
  atomically; least-recently-used files are evicted to keep the folder under LORA_CACHE_BYTES (default 5 GiB).
  The same URL is not fetched again (a changed file needs a new URL). A fetched LoRA is held open by its job,
  so eviction cannot pull it from under a queued request.

Applying (`style_lora`, around the batch's pipeline call)
- Loaded as the peft adapter "style" at `lora_scale` into the UNet and, where the file has them, the text
  encoders (kohya `lora_unet_`/`lora_te_`/`lora_te1_`/`lora_te2_` keys or the diffusers/peft `unet.`/
  `text_encoder.` layout). In the LCM-LoRA modes the LCM-LoRA is already fused into the UNet's base weights
  (lib/loading.fuse_lora): the style adapter adds on top, the same as two adapters with LCM's at 1.0.
- Checked: every layer of the file must land in the model with its shape; otherwise the request fails with
  an InputError naming the mismatch (layers not in the model, other shapes, the cross-attention widths).
- Always removed on exit (success, error, cancel): unload_lora_weights() puts the original layers back
  (exact; the fused LCM weights live in those layers and stay), fused QKV attention is restored, and the
  model is checked to hold no adapter layer.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urljoin, urlsplit

from lib.engine.inputs import InputError
from lib.engine.modes import MODES
from lib.settings import Settings

log = logging.getLogger(__name__)

ADAPTER = "style"
MAX_REDIRECTS = 5
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
CONNECT_TIMEOUT, READ_TIMEOUT = 10, 60
CHUNK = 1 << 20
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1}
# Cloud metadata services outside the private ranges (which are refused anyway): Azure's wire server.
METADATA_ADDRESSES = {ipaddress.ip_address(a) for a in ("168.63.129.16", "169.254.169.254", "fd00:ec2::254",
                                                        "100.100.100.200")}
CROSS_ATTENTION_BASES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
COMPONENT_LABELS = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_2": "second text encoder"}


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
                raise InputError(f"lora_url: host {host} resolves to {sockaddr[0]}, {why}; only public addresses "
                                 "are allowed")
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
                    return connection.create_connection(sockaddr[:2], self.timeout, source_address=self.source_address,
                                                        socket_options=self.socket_options)
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
                pools[scheme] = type(f"Guarded{pool.__name__}", (pool,),
                                     {"ConnectionCls": _guarded_connection(pool.ConnectionCls)})
            self.poolmanager.pool_classes_by_scheme = pools

    session = requests.Session()
    session.trust_env = False  # no proxies or .netrc from the environment: the checks are about this host
    for prefix in ("http://", "https://"):
        session.mount(prefix, Adapter(max_retries=0))
    session.headers.update({"User-Agent": "fast-sd-lora-fetch", "Accept-Encoding": "identity"})
    return session


# -- the safetensors header ---------------------------------------------------------------------------------------
def _not_safetensors(prefix: bytes) -> str:
    if prefix.startswith(b"PK\x03\x04"):
        kind = "a zip archive (the PyTorch .pt/.ckpt/.bin format, which holds pickled code)"
    elif prefix[:1] == b"\x80" and prefix[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        kind = "a Python pickle (.pt/.ckpt/.bin)"
    elif prefix.lstrip()[:1] in (b"<",):
        kind = "an HTML/XML page (is the URL a direct download link?)"
    else:
        kind = "not in the safetensors format"
    return (f"lora_url: the file is {kind}; only .safetensors LoRA files are accepted (pickle-based files are "
            "never loaded)")


def check_header(prefix: bytes) -> tuple[dict, int] | None:
    """(header, total file size) from the file's first bytes, or None if more bytes are needed. Raises InputError
    for anything that is not a well-formed safetensors header."""
    if len(prefix) < 8:
        return None
    (n,) = struct.unpack("<Q", prefix[:8])
    if not 2 <= n <= MAX_HEADER_BYTES:
        raise InputError(_not_safetensors(prefix))
    if len(prefix) < 8 + n:
        if prefix[8:9] not in (b"{", b""):
            raise InputError(_not_safetensors(prefix))
        return None
    try:
        header = json.loads(prefix[8: 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InputError(_not_safetensors(prefix)) from None
    if not isinstance(header, dict):
        raise InputError(_not_safetensors(prefix))
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise InputError("lora_url: the safetensors header's __metadata__ is not a map of strings")
            continue
        ok = (isinstance(info, dict) and info.get("dtype") in DTYPE_BYTES and isinstance(info.get("shape"), list)
              and all(isinstance(d, int) and d >= 0 for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(o, int) and o >= 0 for o in info["data_offsets"]))
        if not ok:
            raise InputError(f"lora_url: the safetensors header's entry {name[:100]!r} is malformed")
        begin, end = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= d
        if end - begin != numel * DTYPE_BYTES[info["dtype"]]:
            raise InputError(f"lora_url: the safetensors header's tensor {name[:100]!r} has offsets that do not "
                             "match its shape")
        spans.append((begin, end))
    spans.sort()
    position = 0
    for begin, end in spans:
        if begin != position:
            raise InputError("lora_url: the safetensors header's tensors overlap or leave gaps")
        position = end
    return header, 8 + n + position


def read_header(handle: BinaryIO) -> tuple[dict, int]:
    handle.seek(0)
    prefix = handle.read(8)
    if len(prefix) == 8:
        (n,) = struct.unpack("<Q", prefix)
        if n <= MAX_HEADER_BYTES:
            prefix += handle.read(n)
    result = check_header(prefix)
    if result is None:
        raise InputError("lora_url: the file is shorter than its safetensors header")
    return result


# -- the cache ----------------------------------------------------------------------------------------------------
@dataclass
class LoraFile:
    """A fetched LoRA, verified, held open (eviction may unlink the cache file; the job can still read it)."""

    url: str
    path: Path
    size: int
    cached: bool  # found in the cache (no download)
    seconds: float  # fetch time (cache lookup, or download)
    handle: BinaryIO = field(repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def read(self) -> bytes:
        with self._lock:  # several jobs of one batch may share the handle
            self.handle.seek(0)
            return self.handle.read()

    def close(self) -> None:
        self.handle.close()


_url_locks = [threading.Lock() for _ in range(64)]  # by URL hash: one download of a URL at a time
_guard = threading.Lock()


def cache_key(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def fetch(url: str) -> LoraFile:
    """The LoRA at `url`, from the cache or downloaded into it (checked as the module docstring says)."""
    check_url(url)
    started = time.perf_counter()
    folder = Settings().lora_cache_dir
    key = cache_key(url)
    path = folder / f"{key}.safetensors"
    with _url_locks[int(key[:8], 16) % len(_url_locks)]:  # a second request for the URL then finds it cached
        handle = _open_cached(path)
        cached = handle is not None
        if handle is None:
            folder.mkdir(parents=True, exist_ok=True)
            _download(url, path)
            with _guard:  # not in the middle of an eviction
                _touch(path)
                handle = open(path, "rb")
            evict(folder, Settings().lora_cache_bytes, keep=path)
    size = os.fstat(handle.fileno()).st_size
    seconds = time.perf_counter() - started
    log.info("lora %s: %s (%.1f MB) in %.3f s", shown(url), "cache hit" if cached else "downloaded", size / 1e6,
             seconds)
    return LoraFile(url, path, size, cached, seconds, handle)


def _open_cached(path: Path) -> BinaryIO | None:
    with _guard:  # not in the middle of an eviction; once open, an eviction cannot take it from this request
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            return None
        _touch(path)
    try:
        _, total = read_header(handle)
        if total != os.fstat(handle.fileno()).st_size:
            raise InputError("size")
    except InputError:  # damaged on disk: fetch it again
        handle.close()
        log.warning("lora cache: %s is damaged; fetching it again", path.name)
        path.unlink(missing_ok=True)
        return None
    return handle


def _touch(path: Path) -> None:
    """Least recently used = oldest mtime (set to the nanosecond: the file system's own clock is coarser)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def evict(folder: Path, budget: int, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used LoRAs until the folder holds at most `budget` bytes (never `keep`).
    Returns the files deleted."""
    with _guard:
        entries = []
        for p in folder.glob("*.safetensors"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime_ns, st.st_size, p))
        for p in folder.glob(".*.part"):  # leftovers of a killed process
            with contextlib.suppress(FileNotFoundError):
                if time.time() - p.stat().st_mtime > 3600:
                    p.unlink()
        total = sum(size for _, size, _ in entries)
        deleted = []
        for _, size, p in sorted(entries, key=lambda e: (e[0], e[2].name)):
            if total <= budget:
                break
            if keep is not None and p == keep:
                continue
            p.unlink(missing_ok=True)
            total -= size
            deleted.append(p)
        if deleted:
            log.info("lora cache: evicted %d file(s) to stay under %.1f MB", len(deleted), budget / 1e6)
        return deleted


def _download(url: str, path: Path) -> None:
    import requests

    settings = Settings()
    limit, deadline = settings.lora_max_bytes, time.monotonic() + settings.lora_download_timeout
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    session = _session()
    try:
        response = None
        for _ in range(MAX_REDIRECTS + 1):
            check_url(url)
            try:
                response = session.get(url, stream=True, allow_redirects=False,
                                       timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
            except requests.RequestException as e:
                raise InputError(f"lora_url: could not download {shown(url)}: {_reason(e)}") from None
            if response.status_code in (301, 302, 303, 307, 308) and response.headers.get("Location"):
                url = urljoin(url, response.headers["Location"])
                response.close()
                continue
            break
        else:
            raise InputError(f"lora_url: more than {MAX_REDIRECTS} redirects")
        with response:
            if response.status_code != 200:
                raise InputError(f"lora_url: {shown(url)} answered HTTP {response.status_code}; expected 200 and "
                                 "the file")
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > limit:
                raise InputError(f"lora_url: the file is {int(length) / 1e6:.1f} MB; allowed: up to {limit / 1e6:.1f} "
                                 "MB (LORA_MAX_BYTES)")
            _stream(response, tmp, limit, deadline)
        os.replace(tmp, path)
    except requests.RequestException as e:
        raise InputError(f"lora_url: could not download {shown(url)}: {_reason(e)}") from None
    finally:
        session.close()
        tmp.unlink(missing_ok=True)


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
                        raise InputError(f"lora_url: the file is {total / 1e6:.1f} MB; allowed: up to "
                                         f"{limit / 1e6:.1f} MB (LORA_MAX_BYTES)")
                    prefix = b""
            if total is not None and received > total:
                raise InputError("lora_url: the file is longer than its safetensors header says")
            out.write(chunk)
            if time.monotonic() > deadline:
                raise InputError("lora_url: the download took too long (LORA_DOWNLOAD_TIMEOUT)")
        if total is None:
            raise InputError(_not_safetensors(prefix) if len(prefix) >= 8 else
                             "lora_url: the file is too short to be a safetensors file")
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


# -- applying -------------------------------------------------------------------------------------------------------
def load_state_dict(lora: LoraFile) -> dict:
    """The tensors of a fetched file, read through the job's open handle (the cache may have evicted the file);
    the header is checked again first. Only safetensors' own parser ever reads the file."""
    from safetensors.torch import load, load_file

    with lora._lock:
        _, total = read_header(lora.handle)
        if total != os.fstat(lora.handle.fileno()).st_size:
            raise InputError("lora_url: the cached file does not match its safetensors header")
        same_file = Path(f"/proc/self/fd/{lora.handle.fileno()}")  # Linux: the open file, even if unlinked
        if same_file.exists():
            return load_file(same_file)  # memory-mapped: one copy, not two
        lora.handle.seek(0)
        return load(lora.handle.read())


_DOWN = re.compile(r"(?:\.lora_A|\.lora_down|[._]lora\.down|\.lora_linear_layer\.down)\.weight$")
_MODULE = [
    (re.compile(r"^(.*?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.down\.weight$"), None),
    (re.compile(r"^(.*)\.(?:lora_A|lora_down|lora\.down|lora_linear_layer\.down)\.weight$"), ""),
]
_TE_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _module_name(key: str, component: str) -> str:
    """The model layer a (diffusers-format) down-weight key is for, as named_modules() names it, roughly."""
    key = key[len(component) + 1:]
    for pattern, _ in _MODULE:
        if m := pattern.match(key):
            name = m.group(1)
            if m.lastindex == 2:
                projection = m.group(2)
                if component == "unet":
                    name += "." + ("to_out.0" if projection == "to_out" else projection)
                else:
                    name += "." + _TE_NAMES[projection]
            return name.removeprefix("text_model.")
    return key


def _components(pipe) -> dict:
    return {c: getattr(pipe, c) for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None}


def _adapter_layers(module, adapter: str | None = ADAPTER) -> list[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name.removeprefix("text_model.") for name, m in module.named_modules()
            if isinstance(m, BaseTunerLayer) and (adapter is None or adapter in getattr(m, "lora_A", {}))]


def _expected_layers(pipe, state: dict) -> dict[str, set[str]]:
    """Per pipeline component, the layers the file has LoRA weights for (diffusers' conversion of its keys)."""
    try:
        result = pipe.lora_state_dict(dict(state), unet_config=pipe.unet.config)
    except Exception as e:  # noqa: BLE001 - diffusers raises ValueError, KeyError, ... on foreign layouts
        raise InputError(f"lora_url: not a LoRA layout that can be read (kohya or diffusers/peft): {str(e)[:300]}") \
            from None
    converted = result[0] if isinstance(result, tuple) else result
    layers: dict[str, set[str]] = {}
    for key in converted:
        if _DOWN.search(key):
            component = key.split(".", 1)[0]
            layers.setdefault(component, set()).add(_module_name(key, component))
    return layers


def _mismatch(pipe, mode_name: str, state: dict, expected: dict[str, set[str]], error: Exception | None) -> InputError:
    """The InputError that says how the file does not fit the mode's model."""
    base = MODES[mode_name].base_model
    parts = []
    for component, module in _components(pipe).items():
        wanted = expected.get(component, set())
        missing = sorted(name for name in wanted if not _has_layer(module, name))
        if missing:
            parts.append(f"{len(missing)} of its {len(wanted)} {COMPONENT_LABELS[component]} layers are not in the "
                         f"model (e.g. {', '.join(missing[:2])})")
    shapes = re.findall(r"size mismatch for (\S+?)\.lora_[AB]\.\S+: copying a param with shape torch\.Size\((\[.*?\])\)"
                        r" from checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)", str(error or ""))
    if shapes:
        name, theirs, ours = shapes[0]
        parts.append(f"{len({s[0] for s in shapes})} layers have other shapes (e.g. {name}: LoRA {theirs}, "
                     f"model {ours})")
    if error is not None and not shapes and not parts:
        parts.append(str(error).strip().splitlines()[0][:300])
    width = _cross_attention_width(state)
    model_width = pipe.unet.config.cross_attention_dim
    if width and width != model_width:
        parts.append(f"its cross-attention width is {width}{_base_note(width)}, the model's {model_width}"
                     f"{_base_note(model_width)}")
    return InputError(f"lora_url: this LoRA does not fit mode {mode_name}'s model ({base}): "
                      f"{'; '.join(parts) or 'its layers do not match'}. It was probably made for another base model; "
                      f"use one made for {base}")


def _base_note(width) -> str:
    return f" ({CROSS_ATTENTION_BASES[width]})" if width in CROSS_ATTENTION_BASES else ""


def _has_layer(module, name: str) -> bool:
    for candidate in (name, f"text_model.{name}"):
        try:
            module.get_submodule(candidate)
            return True
        except AttributeError:
            pass
    return False


def _cross_attention_width(state: dict) -> int | None:
    """The text-embedding width the LoRA's cross-attention key/value layers take (768 SD 1.x, 2048 SDXL, ...)."""
    for key, tensor in state.items():
        if ("attn2" in key and ("to_k" in key or "to_v" in key) and ("down" in key or "lora_A" in key)
                and tensor.ndim == 2):
            return int(tensor.shape[1])
    return None


def _apply(pipe, state: dict, scale: float, mode_name: str) -> None:
    import diffusers
    import transformers

    expected = _expected_layers(pipe, state)
    components = _components(pipe)
    foreign = sorted(set(expected) - set(COMPONENT_LABELS))
    if foreign:
        raise InputError(f"lora_url: the file has layers for {', '.join(foreign[:3])}, which a Stable Diffusion "
                         f"pipeline does not have; it is not a LoRA for mode {mode_name}")
    if not expected.get("unet"):
        raise InputError("lora_url: the file has no UNet layers; a style LoRA must adapt the UNet")
    absent = [c for c in expected if c not in components]
    if absent:
        raise InputError(f"lora_url: the file has {COMPONENT_LABELS[absent[0]]} layers, which mode {mode_name}'s model "
                         f"({MODES[mode_name].base_model}) does not have; it was made for another base model "
                         f"(e.g. SDXL)")
    levels = diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity(logging.CRITICAL)  # our own message says what did not fit
    transformers.utils.logging.set_verbosity(logging.ERROR)
    try:
        try:
            pipe.load_lora_weights(dict(state), adapter_name=ADAPTER, low_cpu_mem_usage=True)
        except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as e:
            raise _mismatch(pipe, mode_name, state, expected, e) from None
        loaded = {c: len(_adapter_layers(m)) for c, m in components.items()}
        if any(loaded.get(c, 0) != len(layers) for c, layers in expected.items()) \
                or any(n and c not in expected for c, n in loaded.items()):
            raise _mismatch(pipe, mode_name, state, expected, None)
        pipe.set_adapters([ADAPTER], [scale])
    finally:
        diffusers.utils.logging.set_verbosity(levels[0])
        transformers.utils.logging.set_verbosity(levels[1])


def _unfuse_attention(unet):
    """Fused QKV projections (lib/speed.py) run to_qkv and would bypass adapters on to_q/to_k/to_v: while the
    adapter is on, the separate projections are back (views of the fused weights: no copy) and the plain
    processors run. Returns what to restore (None: nothing changed)."""
    from lib.engine.speed import restore_projections

    processors = unet.attn_processors
    if not any("Fused" in type(p).__name__ for p in processors.values()):
        return None
    rebuilt = restore_projections(unet)
    original = getattr(unet, "original_attn_processors", None)
    if original and len(original) == len(processors):
        unet.set_attn_processor(dict(original))
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    return processors, rebuilt


def _remove(pipe, restore) -> None:
    from lib.engine.speed import drop_projections

    pipe.unload_lora_weights()  # swaps the original layers back in: exact, and the fused LCM weights stay
    if restore is not None:
        processors, rebuilt = restore
        pipe.unet.set_attn_processor(processors)
        drop_projections(rebuilt)
    left = {c: n for c, m in _components(pipe).items() if (n := len(_adapter_layers(m, None)))}
    if left:
        raise RuntimeError(f"the style LoRA could not be removed ({left} adapter layers left); the engine's "
                           "models are no longer the original ones")


@contextlib.contextmanager
def style_lora(pipe, lora: LoraFile | dict, scale: float, mode_name: str) -> Iterator[None]:
    """`lora` applied to `pipe` at `scale` inside the block; removed on the way out, whatever happens."""
    if getattr(pipe.unet, "_compiled_call_impl", None) is not None:
        log.warning("the UNet is compiled (SPEED_COMPILE): a LoRA makes torch recompile it, twice per request")
    state = lora if isinstance(lora, dict) else load_state_dict(lora)
    restore = _unfuse_attention(pipe.unet)
    try:
        _apply(pipe, state, scale, mode_name)
        yield
    finally:
        _remove(pipe, restore)
