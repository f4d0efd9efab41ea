"""Safe handling of image inputs: http(s) fetches, raw base64 and ``data:`` URLs.

Everything here treats the input as hostile:

* Fetching (SSRF): only http/https; a total timeout per fetch covering every redirect hop
  and the body; the byte cap is enforced while streaming (and early from Content-Length);
  redirects are followed by hand so each hop is re-validated. Non-public addresses are
  refused at three layers, so a DNS answer that changes between checks (rebinding) cannot
  slip through: literal-IP hosts are checked before any traffic, the connector's resolver
  drops non-public answers so it can only ever connect to vetted IPs, and a socket factory
  re-checks the exact address each socket is about to connect to. The peer address of the
  response is checked once more when available (it covers caller-supplied sessions).
* Decoding: a format allowlist (Pillow would otherwise shell out to Ghostscript for EPS),
  the pixel cap checked from the header BEFORE any pixel data is decoded (decompression
  bombs), then conversion to RGB.
* Memory (`process_images`): each source is fetched, decoded and handed to a converter (the
  server tiles it) in a worker thread, one at a time per slot; only the converter's result is
  kept. A server-wide pixel budget bounds the bitmaps being decoded across all requests, and
  one deadline bounds all of a request's fetches together.

Error messages name the deployment settings (IMAGE_MAX_BYTES, ...) so a user knows which
knob an operator would have to turn.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import io
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from aiohappyeyeballs import AddrInfoType
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image, ImageOps
from yarl import URL

from embed_serving.budget import Budget

T = TypeVar("T")

__all__ = [
    "ImageError",
    "ImageInputError",
    "ImageLimits",
    "ImageSource",
    "base64_bytes",
    "create_session",
    "data_url_bytes",
    "decode_base64",
    "decode_data_url",
    "decode_image_bytes",
    "fetch_image_bytes",
    "finish_decode",
    "load_images",
    "open_image",
    "process_images",
]


@dataclass(frozen=True)
class ImageLimits:
    """Per-image limits; each field maps to the deployment setting named in its comment."""

    max_bytes: int = 20 * 1024 * 1024  # IMAGE_MAX_BYTES: encoded (file) size
    # IMAGE_MAX_PIXELS. 50 MP admits 48/50 MP phone photos (8160x6120) and A4 scans at
    # 600 dpi (35 MP) while bounding one decoded RGB image to 150 MB. The models downscale
    # to ~1-2 MP anyway, so bigger inputs would only cost memory and CPU. Pillow's own
    # bomb guard refuses > ~179 MP at open time, so values above that have no effect.
    max_pixels: int = 50_000_000
    fetch_timeout_s: float = 10.0  # IMAGE_FETCH_TIMEOUT_S: whole fetch, all hops + body
    max_redirects: int = 3  # IMAGE_MAX_REDIRECTS
    allow_private: bool = False  # IMAGE_ALLOW_PRIVATE_URLS
    max_concurrency: int = 8  # IMAGE_FETCH_CONCURRENCY: fetch/decode slots per request
    # IMAGE_FETCH_DEADLINE_S: wall time for all of one request's fetches together. Without it a
    # request of n URLs could take n / max_concurrency x fetch_timeout_s.
    fetch_deadline_s: float = 30.0
    # IMAGE_DECODE_BUDGET_PIXELS: decoded pixels in flight across ALL requests (the decoded
    # bitmap is the big transient: 3-8 bytes a pixel while it is converted and resized). Two
    # maximal images at a time by default; it must admit one image of max_pixels.
    decode_budget_pixels: int = 100_000_000
    # IMAGE_MEMORY_BUDGET_BYTES: encoded images being fetched/decoded plus the tiles kept until
    # the request ends, across ALL requests, reserved per request at its worst case up front.
    memory_budget_bytes: int = 4 << 30

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0 or self.max_concurrency <= 0:
            raise ValueError("image max_bytes, max_pixels and max_concurrency must be > 0")
        if self.fetch_timeout_s <= 0 or self.max_redirects < 0:
            raise ValueError("image fetch_timeout_s must be > 0 and max_redirects >= 0")
        if not self.fetch_deadline_s > 0 or self.memory_budget_bytes <= 0:
            raise ValueError("image fetch_deadline_s and memory_budget_bytes must be > 0")
        if self.decode_budget_pixels < self.max_pixels:
            # Otherwise an image within IMAGE_MAX_PIXELS could never be decoded.
            raise ValueError(
                f"setting IMAGE_DECODE_BUDGET_PIXELS={self.decode_budget_pixels} must be >= "
                f"IMAGE_MAX_PIXELS={self.max_pixels}"
            )


class ImageError(Exception):
    """Bad image input. ``str(e)`` is a user-facing reason without the item index."""


class ImageInputError(Exception):
    """Raised by :func:`load_images` for the lowest-index source that failed."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"image {index}: {reason}")
        self.index = index
        self.reason = reason


class ImagesAbandoned(Exception):
    """Raised by :func:`process_images` when the client hung up: its fetches were stopped."""


# How often `process_images` asks whether the client is still there.
DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class ImageSource:
    url: str | None = None  # http(s) URL or data: URL
    content: str | None = None  # raw base64


# --------------------------------------------------------------------------- decoding

# Formats worth accepting from the internet. Anything else (EPS -> Ghostscript, exotic
# scientific formats with little-tested parsers) is refused as "not a decodable image".
# MPO is how Pillow opens many camera/phone JPEGs.
_ALLOWED_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "WEBP", "BMP", "TIFF", "AVIF")
_NOT_DECODABLE = "not a decodable image"
_WHITE = (255, 255, 255)


def _too_big(size: int, limits: ImageLimits, *, at_least: bool = False) -> ImageError:
    qualifier = "over " if at_least else ""
    return ImageError(f"image is {qualifier}{size} bytes, limit IMAGE_MAX_BYTES={limits.max_bytes}")


def _allowed_formats() -> list[str]:
    Image.init()  # registers plugins; cheap after the first call
    return [f for f in _ALLOWED_FORMATS if f in Image.OPEN]


def decode_image_bytes(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode an encoded image into a loaded RGB image, enforcing byte and pixel caps."""
    return finish_decode(open_image(data, limits), limits)


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Parse the header only (no pixel data decoded yet) and check the byte and pixel caps, so
    the caller knows the decoded size before paying for it. Finish with `finish_decode`."""
    if len(data) > limits.max_bytes:
        raise _too_big(len(data), limits)
    if not data:
        raise ImageError("empty image")
    try:
        im = Image.open(io.BytesIO(data), formats=_allowed_formats())
    except Image.DecompressionBombError:
        # Pillow's own guard (~179 MP) fires inside Image.open, before our check can run.
        raise ImageError(
            f"image has over {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels, "
            f"limit IMAGE_MAX_PIXELS={limits.max_pixels}"
        ) from None
    except Exception:  # Pillow raises many types for hostile/corrupt/truncated input
        raise ImageError(_NOT_DECODABLE) from None
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageError(_NOT_DECODABLE)
    if width * height > limits.max_pixels:
        raise ImageError(
            f"image is {width}x{height} ({width * height} pixels), "
            f"limit IMAGE_MAX_PIXELS={limits.max_pixels}"
        )
    return im


def finish_decode(im: Image.Image, limits: ImageLimits) -> Image.Image:
    """Decode an image from `open_image` (first frame of animations) and convert it to RGB."""
    try:
        im.load()
        return _to_rgb(im)
    except Image.DecompressionBombError:
        raise ImageError(
            f"image has over {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels, "
            f"limit IMAGE_MAX_PIXELS={limits.max_pixels}"
        ) from None
    except Exception:
        raise ImageError(_NOT_DECODABLE) from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Normalise any decoded mode to RGB.

    EXIF orientation is applied (the pixels a camera stores are often sideways; a viewer,
    and so the user, sees them rotated), with malformed EXIF ignored rather than refused.
    Transparency is composited onto white, the usual page/document background, so
    transparent regions do not turn into arbitrary colours (often black). 16-bit and
    float greyscale are scaled to 8 bits instead of clipped (a plain convert turns most
    16-bit images white). CMYK and the rest use Pillow's conversion (no ICC handling).
    """
    # Malformed EXIF is common and not worth refusing the image for.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(im, in_place=True)  # in place: no copy when upright
    if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit integer or float greyscale
        top = im.getextrema()[1]
        if not isinstance(top, int | float):
            top = 255
        if im.mode == "F":
            scale = 255.0 if top <= 1.0 else 1.0  # float images are usually in [0, 1]
        else:
            scale = 1 / 257 if top > 255 else 1.0  # assume the 16-bit range: 65535 / 257 = 255
            im = im.convert("I")
        if scale != 1.0:
            im = im.point(lambda v: v * scale + 0.5)  # + 0.5: round, the L conversion truncates
        im = im.convert("L")
        # A transparency key in the wide range no longer matches the rescaled values.
        im.info.pop("transparency", None)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        # No copy when it already is RGBA: the page's bitmap is the biggest thing we hold.
        rgba = im if im.mode == "RGBA" else im.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im if im.mode == "RGB" else im.convert("RGB")


_WHITESPACE = re.compile(r"\s+")
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")


def decode_base64(content: str, limits: ImageLimits) -> Image.Image:
    """Decode raw base64 (standard or urlsafe alphabet, whitespace and missing padding
    tolerated) into an RGB image. A ``data:`` URL is accepted here too."""
    return decode_image_bytes(base64_bytes(content, limits), limits)


def base64_bytes(content: str, limits: ImageLimits) -> bytes:
    """The encoded image inside raw base64 or a ``data:`` URL (see `decode_base64`)."""
    if content[:5].lower() == "data:":
        return data_url_bytes(content, limits)
    return _b64decode(content, limits)


def _b64decode(content: str, limits: ImageLimits) -> bytes:
    # Pre-check the encoded length so we never strip or decode something huge; the slack
    # allows MIME-style line breaks (CRLF every 76 chars is < 3 %).
    max_encoded = 4 * -(-limits.max_bytes // 3)
    if len(content) > max_encoded + max_encoded // 16 + 1024:
        raise _too_big(limits.max_bytes, limits, at_least=True)
    text = _WHITESPACE.sub("", content)
    if not text:
        raise ImageError("empty image content")
    padding = len(text) - len(text.rstrip("="))
    decoded_size = len(text) * 3 // 4 - padding
    if decoded_size > limits.max_bytes:
        raise _too_big(decoded_size, limits)
    text = text.translate(_URLSAFE_TO_STANDARD)
    if len(text) % 4:  # unpadded input (common with urlsafe encoders)
        text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        raise ImageError("invalid base64") from None


def decode_data_url(url: str, limits: ImageLimits) -> Image.Image:
    """Decode ``data:image/<subtype>[;param=value...];base64,<payload>`` into RGB."""
    return decode_image_bytes(data_url_bytes(url, limits), limits)


def data_url_bytes(url: str, limits: ImageLimits) -> bytes:
    """The encoded image inside a ``data:image/...;base64,`` URL."""
    if url[:5].lower() != "data:":
        raise ImageError("not a data: URL")
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise ImageError("malformed data: URL, missing ','")
    params = [p.strip().lower() for p in header.split(";")]
    media_type = params[0]
    if not media_type.startswith("image/") or len(media_type) == len("image/"):
        raise ImageError(f"data: URL must have an image/* media type, got '{media_type[:50]}'")
    if len(params) < 2 or params[-1] != "base64":
        raise ImageError("data: URL must be base64-encoded (';base64,')")
    return _b64decode(payload, limits)


# --------------------------------------------------------------------------- addresses

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _refusal_reason(ip: str) -> str | None:
    """Why connecting to ``ip`` is refused (None: publicly routable)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return "not an IP address"
    if isinstance(addr, ipaddress.IPv6Address):
        # IPv6 forms that reach an embedded IPv4 address: judge that address.
        embedded = addr.ipv4_mapped or addr.sixtofour
        if embedded is None and addr in _NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None and (reason := _refusal_reason(str(embedded))):
            return reason
        if addr.is_site_local:
            return "site-local"
    for attr, reason in (
        ("is_loopback", "loopback"),
        ("is_unspecified", "unspecified"),
        ("is_link_local", "link-local"),  # 169.254.169.254: cloud metadata
        ("is_multicast", "multicast"),
        ("is_reserved", "reserved"),
        ("is_private", "private"),
    ):
        if getattr(addr, attr):
            return reason
    if not addr.is_global:  # e.g. 100.64.0.0/10 (CGNAT, Alibaba's metadata service)
        return "not globally routable"
    return None


def _refusal_message(ip: str, reason: str) -> str:
    return f"refused address {ip} ({reason}), allowed only with IMAGE_ALLOW_PRIVATE_URLS=true"


class _RefusedAddressError(OSError):
    """Raised inside aiohttp's connect path; an OSError so aiohttp wraps it as usual."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EACCES, message)
        self.message = message


def _check_ip(ip: str) -> None:
    if reason := _refusal_reason(ip):
        raise _RefusedAddressError(_refusal_message(ip, reason))


class _PublicOnlyResolver(AbstractResolver):
    """Resolver that drops non-public answers, so the connector only sees vetted IPs."""

    def __init__(self) -> None:
        # The threaded (getaddrinfo) resolver honours /etc/hosts and has nothing to close.
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await self._inner.resolve(host, port, family)
        public = [a for a in answers if _refusal_reason(a["host"]) is None]
        if not public:
            if not answers:
                raise OSError(errno.EHOSTUNREACH, f"no addresses for {host}")
            _check_ip(answers[0]["host"])  # raises with the first refused address
        return public

    async def close(self) -> None:
        await self._inner.close()


def _guarded_socket(addr_info: AddrInfoType) -> socket.socket:
    """Socket factory: the last check, on the exact address about to be connected to."""
    family, type_, proto, _, sockaddr = addr_info
    _check_ip(str(sockaddr[0]))
    return socket.socket(family=family, type=type_, proto=proto)


def _check_peer(resp: aiohttp.ClientResponse, limits: ImageLimits) -> None:
    # The connection may already be released when a small body arrived with the headers;
    # the socket factory has checked the address in that case (for our own sessions).
    if limits.allow_private or resp.connection is None or resp.connection.transport is None:
        return
    peer = resp.connection.transport.get_extra_info("peername")
    if peer and (reason := _refusal_reason(str(peer[0]))):
        raise ImageError(_refusal_message(str(peer[0]), reason))


_REFUSED_IN_TEXT = re.compile(r"refused address \S+ \([^)]*\)")


def _find_refusal(exc: BaseException) -> str | None:
    """The refusal behind an aiohttp connect error, if any (walks the cause chain;
    falls back to the text because aiohappyeyeballs merges multi-address failures)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _RefusedAddressError):
            return current.message
        if match := _REFUSED_IN_TEXT.search(str(current)):
            return f"{match.group(0)}, allowed only with IMAGE_ALLOW_PRIVATE_URLS=true"
        current = current.__cause__ or current.__context__
    return None


# --------------------------------------------------------------------------- fetching

_USER_AGENT = "nv-retrieval-truss-image-fetcher/0.1"
_REQUEST_HEADERS = {
    "User-Agent": _USER_AGENT,
    "Accept": "image/*",
    # Images are already compressed; asking for identity avoids compression bombs. (A
    # server that compresses anyway is still decoded, and the cap applies after it.)
    "Accept-Encoding": "identity",
}
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK_SIZE = 64 * 1024


def create_session(limits: ImageLimits) -> aiohttp.ClientSession:
    """A ClientSession wired with the address guards (unless ``allow_private``).

    Must be created inside a running event loop; close it (``async with``) when done.
    """
    guarded = not limits.allow_private
    connector = aiohttp.TCPConnector(
        limit=limits.max_concurrency,
        resolver=_PublicOnlyResolver() if guarded else None,
        socket_factory=_guarded_socket if guarded else None,
    )
    return aiohttp.ClientSession(
        connector=connector,
        headers=_REQUEST_HEADERS,
        # Backstop only; the per-fetch total timeout is enforced around all hops.
        timeout=aiohttp.ClientTimeout(total=limits.fetch_timeout_s),
        cookie_jar=aiohttp.DummyCookieJar(),  # no state shared between users' URLs
        trust_env=False,  # a proxy from the environment would bypass the address guards
    )


def _parse_http_url(url: str | URL) -> URL:
    try:
        parsed = url if isinstance(url, URL) else URL(url)
    except (ValueError, TypeError):
        raise ImageError("invalid URL") from None
    scheme = parsed.scheme.lower()
    if scheme not in ("http", "https"):
        shown = scheme[:20] or "(none)"
        raise ImageError(f"unsupported URL scheme '{shown}', only http and https")
    if not parsed.host:
        raise ImageError("invalid URL, no host")
    return parsed


def _check_url_target(url: URL, limits: ImageLimits) -> None:
    """Scheme/host check for one hop, plus literal IPs (which skip the resolver)."""
    _parse_http_url(url)
    if limits.allow_private:
        return
    host = url.host or ""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return  # a hostname: its addresses are vetted by the resolver and socket factory
    if reason := _refusal_reason(host):
        raise ImageError(_refusal_message(host, reason))


async def fetch_image_bytes(
    url: str, limits: ImageLimits, session: aiohttp.ClientSession | None = None
) -> bytes:
    """Fetch an http(s) image body under ``limits``; raises :class:`ImageError`.

    Pass a session from :func:`create_session`; another session lacks the resolver and
    connect-time address guards (only the literal-IP and peer checks then apply).
    """
    target = _parse_http_url(url)
    _check_url_target(target, limits)  # before opening any session or socket
    if session is None:
        async with create_session(limits) as own_session:
            return await _fetch(target, limits, own_session)
    return await _fetch(target, limits, session)


async def _fetch(url: URL, limits: ImageLimits, session: aiohttp.ClientSession) -> bytes:
    try:
        async with asyncio.timeout(limits.fetch_timeout_s):
            return await _follow_redirects(url, limits, session)
    except TimeoutError:  # asyncio's and aiohttp's timeouts are TimeoutError subclasses
        raise ImageError(
            f"fetch timed out after {limits.fetch_timeout_s}s, "
            f"limit IMAGE_FETCH_TIMEOUT_S={limits.fetch_timeout_s}"
        ) from None
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        raise ImageError(_describe_fetch_error(exc)) from None


def _describe_fetch_error(exc: BaseException) -> str:
    if refusal := _find_refusal(exc):
        return refusal
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"could not resolve host {exc.host}"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | aiohttp.ClientSSLError):
        return f"TLS error connecting to {exc.host}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"could not connect to {exc.host}:{exc.port}"
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        return "connection closed while reading the image"
    if isinstance(exc, aiohttp.InvalidURL | ValueError):
        return "invalid URL"
    return f"fetch failed ({type(exc).__name__})"


async def _follow_redirects(url: URL, limits: ImageLimits, session: aiohttp.ClientSession) -> bytes:
    for _ in range(limits.max_redirects + 1):
        _check_url_target(url, limits)
        async with session.get(url, allow_redirects=False, headers=_REQUEST_HEADERS) as resp:
            _check_peer(resp, limits)
            if resp.status in _REDIRECT_STATUSES:
                location = resp.headers.get("Location")
                if not location:
                    raise ImageError(f"HTTP status {resp.status} without a Location header")
                url = resp.url.join(URL(location))
                continue
            if not 200 <= resp.status < 300:
                raise ImageError(f"HTTP status {resp.status}")
            return await _read_capped(resp, limits)
    raise ImageError(f"too many redirects, limit IMAGE_MAX_REDIRECTS={limits.max_redirects}")


async def _read_capped(resp: aiohttp.ClientResponse, limits: ImageLimits) -> bytes:
    declared = resp.content_length
    if declared is not None and declared > limits.max_bytes:
        resp.close()  # drop the connection instead of draining the body
        raise _too_big(declared, limits)
    body = bytearray()
    async for chunk in resp.content.iter_chunked(_CHUNK_SIZE):
        if len(body) + len(chunk) > limits.max_bytes:
            resp.close()
            raise _too_big(limits.max_bytes, limits, at_least=True)
        body += chunk
    return bytes(body)


# --------------------------------------------------------------------------- batches


def _deadline_error(limits: ImageLimits) -> ImageError:
    return ImageError(
        "image fetch did not finish within the request deadline "
        f"IMAGE_FETCH_DEADLINE_S={limits.fetch_deadline_s:g}"
    )


_fallback_pool: ThreadPoolExecutor | None = None


def _default_pool() -> ThreadPoolExecutor:
    global _fallback_pool
    if _fallback_pool is None:
        _fallback_pool = ThreadPoolExecutor(4, thread_name_prefix="image")
    return _fallback_pool


async def process_images(
    sources: Sequence[ImageSource],
    limits: ImageLimits,
    convert: Callable[[Image.Image], T],
    *,
    pixels: Budget | None = None,
    executor: Executor | None = None,
    disconnected: Callable[[], Awaitable[bool]] | None = None,
) -> list[T]:
    """Fetch / decode each source and hand its RGB image to `convert` (in a worker thread),
    keeping only what `convert` returns, in input order.

    One image at a time per slot: at most `max_concurrency` sources of this call are in
    flight, and each decoded bitmap is dropped as soon as `convert` (e.g. tiling) is done with
    it, so a request of many big pages never holds more than a few bitmaps. `pixels` is the
    server-wide IMAGE_DECODE_BUDGET_PIXELS budget (one per call when None). Fetches share
    one deadline (IMAGE_FETCH_DEADLINE_S from the start of the call). The lowest-index
    failure raises :class:`ImageInputError`; later sources are cancelled at once. When
    `disconnected` says the client hung up (asked every DISCONNECT_POLL_S), every fetch and
    decode not yet done is cancelled, none is started, and :class:`ImagesAbandoned` is raised.
    """
    if not sources:
        return []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limits.fetch_deadline_s
    pool = executor or _default_pool()
    budget = pixels or Budget(limits.decode_budget_pixels, "IMAGE_DECODE_BUDGET_PIXELS")
    gate = asyncio.Semaphore(limits.max_concurrency)
    needs_http = any(s.url is not None and s.url[:5].lower() != "data:" for s in sources)
    session = create_session(limits) if needs_http else None
    tasks: list[asyncio.Task[T]] = []

    async def resolve(index: int, source: ImageSource) -> T:
        try:
            async with gate:
                data = await _source_bytes(source, limits, session, pool, deadline)
                im = await _in_thread(pool, None, 0, open_image, data, limits)
                del data  # `im` keeps what it needs
                cost = im.width * im.height
                await budget.acquire(cost)
                # Released by the worker when it is done, not when we are: a cancelled request
                # must not free pixels that a decode still holds.
                return await _in_thread(pool, budget, cost, _decode_convert, im, limits, convert)
        except ImageError:
            # Higher indices can no longer be the reported error: stop their work early.
            for later in tasks[index + 1 :]:
                later.cancel()
            raise

    async def watch(check: Callable[[], Awaitable[bool]]) -> bool:
        while not await check():
            await asyncio.sleep(DISCONNECT_POLL_S)
        for task in tasks:
            task.cancel()
        return True

    watcher = asyncio.create_task(watch(disconnected)) if disconnected is not None else None
    try:
        tasks.extend(asyncio.create_task(resolve(i, s)) for i, s in enumerate(sources))
        results: list[T] = []
        for index, task in enumerate(tasks):  # in order, so the lowest failing index wins
            try:
                results.append(await task)
            except ImageError as exc:
                raise ImageInputError(index, str(exc)) from None
            except asyncio.CancelledError:
                if watcher is not None and watcher.done() and not watcher.cancelled():
                    raise ImagesAbandoned from None
                raise
        return results
    finally:
        if watcher is not None:
            watcher.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # sockets closed before session
        if session is not None:
            await session.close()


async def load_images(sources: Sequence[ImageSource], limits: ImageLimits) -> list[Image.Image]:
    """Resolve all sources concurrently (at most ``max_concurrency`` at a time) into RGB
    images in input order. The lowest-index failure raises :class:`ImageInputError`.
    (The server uses `process_images`, which keeps tiles instead of whole bitmaps.)"""
    return await process_images(sources, limits, _identity)


def _identity(im: Image.Image) -> Image.Image:
    return im


def _decode_convert(im: Image.Image, limits: ImageLimits, convert: Callable[[Image.Image], T]) -> T:
    return convert(finish_decode(im, limits))


async def _in_thread(
    pool: Executor, budget: Budget | None, cost: int, fn: Callable[..., T], *args: Any
) -> T:
    """Run `fn` in `pool` (never on the event loop: decoding a big page takes seconds), and
    give `cost` back to `budget` once the worker has finished or the job was dropped unrun."""
    loop = asyncio.get_running_loop()
    job = pool.submit(fn, *args)
    if budget is not None:

        def done(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nothing to wake
                loop.call_soon_threadsafe(budget.release, cost)

        job.add_done_callback(done)
    return await asyncio.wrap_future(job)


async def _source_bytes(
    source: ImageSource,
    limits: ImageLimits,
    session: aiohttp.ClientSession | None,
    pool: Executor,
    deadline: float,
) -> bytes:
    if (source.url is None) == (source.content is None):
        raise ImageError("image needs exactly one of 'url' or 'content'")
    if source.content is not None:
        return await _in_thread(pool, None, 0, base64_bytes, source.content, limits)
    url = source.url or ""
    if url[:5].lower() == "data:":
        return await _in_thread(pool, None, 0, data_url_bytes, url, limits)
    if asyncio.get_running_loop().time() >= deadline:
        raise _deadline_error(limits)
    try:
        async with asyncio.timeout_at(deadline):
            return await fetch_image_bytes(url, limits, session)
    except TimeoutError:
        raise _deadline_error(limits) from None
