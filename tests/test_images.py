"""Tests for embed_serving.images against a real HTTP server on 127.0.0.1 (no internet)."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from embed_serving import images
from embed_serving.images import (
    ImageError,
    ImageInputError,
    ImageLimits,
    ImageSource,
    decode_base64,
    decode_data_url,
    decode_image_bytes,
    fetch_image_bytes,
    load_images,
)

T = TypeVar("T")

# The test server is on loopback, which the default limits refuse.
LOCAL = ImageLimits(allow_private=True)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def png_bytes(
    width: int = 8, height: int = 6, color: Any = (255, 0, 0), mode: str = "RGB"
) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(width: int = 8, height: int = 6, **save_args: Any) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (0, 0, 255)).save(buf, "JPEG", **save_args)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height but carries no pixel data: a bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --------------------------------------------------------------------------- server

BIG_STREAM_TOTAL = 32 * 1024 * 1024


class LocalServer:
    """aiohttp.web app on 127.0.0.1 in its own thread and event loop."""

    def __init__(self) -> None:
        self.big_stream_sent = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        # handler_cancellation: handlers stop when the client hangs up (as ours should).
        self.runner = web.AppRunner(self._app(), handler_cancellation=True, shutdown_timeout=1)
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.port: int = self.runner.addresses[0][1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    async def _start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def _app(self) -> web.Application:
        app = web.Application()
        png = png_bytes()
        app.router.add_get("/png", _static(png, "image/png"))
        app.router.add_get("/jpeg", _static(jpeg_bytes(), "image/jpeg"))
        app.router.add_get("/html", _static(b"<html><body>hi</body></html>", "text/html"))
        app.router.add_get("/bomb", _static(png_header_only(100_000, 100_000), "image/png"))
        app.router.add_get("/missing", self._missing)
        app.router.add_get("/sized", self._sized)
        app.router.add_get("/slow", self._slow)
        app.router.add_get("/drip", self._drip)
        app.router.add_get("/big-stream", self._big_stream)
        app.router.add_get("/lying-length", self._lying_length)
        app.router.add_get("/redirect/{n}", self._redirect_chain)
        app.router.add_get("/redirect-to", self._redirect_to)
        app.router.add_get("/relative-redirect", self._relative_redirect)
        return app

    async def _missing(self, request: web.Request) -> web.Response:
        return web.Response(status=404, text="nope")

    async def _sized(self, request: web.Request) -> web.Response:
        return _body(b"\0" * int(request.query["n"]), "image/png")

    async def _redirect_to(self, request: web.Request) -> web.Response:
        return _redirect(request.query["target"])

    async def _relative_redirect(self, request: web.Request) -> web.Response:
        return _redirect("png")

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        """Headers after ?ms=; a PNG ?w= pixels wide, or ?status=."""
        await asyncio.sleep(int(request.query.get("ms", "300")) / 1000)
        if "status" in request.query:
            return web.Response(status=int(request.query["status"]))
        return _body(png_bytes(width=int(request.query.get("w", "8"))), "image/png")

    async def _drip(self, request: web.Request) -> web.StreamResponse:
        """Prompt headers, then one byte every 50 ms: defeats per-read timeouts."""
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        await resp.prepare(request)
        for _ in range(60):
            await resp.write(b"\0")
            await asyncio.sleep(0.05)
        return resp

    async def _big_stream(self, request: web.Request) -> web.StreamResponse:
        """Chunked (no Content-Length) body far over any test cap."""
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        await resp.prepare(request)
        chunk = b"\0" * 65536
        while self.big_stream_sent < BIG_STREAM_TOTAL:
            await resp.write(chunk)
            self.big_stream_sent += len(chunk)
        return resp

    async def _lying_length(self, request: web.Request) -> web.StreamResponse:
        """Declares 1 GB, sends a trickle: the client must refuse from the header alone."""
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        resp.content_length = 1_000_000_000
        await resp.prepare(request)
        for _ in range(40):
            await resp.write(b"\0" * 1024)
            await asyncio.sleep(0.05)
        return resp

    async def _redirect_chain(self, request: web.Request) -> web.StreamResponse:
        """/redirect/N takes exactly N redirects to reach a PNG."""
        n = int(request.match_info["n"])
        if n == 0:
            return _body(png_bytes(width=3), "image/png")
        return _redirect(f"/redirect/{n - 1}")


def _static(data: bytes, content_type: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return _body(data, content_type)

    return handler


def _body(data: bytes, content_type: str) -> web.Response:
    return web.Response(body=data, content_type=content_type)


def _redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location})


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    srv = LocalServer()
    yield srv
    srv.close()


@pytest.fixture
def loopback_is_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Treat 127.0.0.1 (only) as public, to exercise the guards with allow_private=False."""
    original = images._refusal_reason

    def patched(ip: str) -> str | None:
        return None if ip == "127.0.0.1" else original(ip)

    monkeypatch.setattr(images, "_refusal_reason", patched)


@pytest.fixture
def connect_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every connection aiohttp's TCP connector opens (host:port)."""
    calls: list[str] = []
    original = aiohttp.TCPConnector.connect

    async def recording(self: aiohttp.TCPConnector, req: Any, *args: Any, **kw: Any) -> Any:
        calls.append(f"{req.url.host}:{req.url.port}")
        return await original(self, req, *args, **kw)

    monkeypatch.setattr(aiohttp.TCPConnector, "connect", recording)
    return calls


def fetch_error(url: str, limits: ImageLimits = LOCAL) -> str:
    with pytest.raises(ImageError) as info:
        run(fetch_image_bytes(url, limits))
    return str(info.value)


# --------------------------------------------------------------------------- fetching


def test_fetch_png_and_jpeg(server: LocalServer) -> None:
    png = run(fetch_image_bytes(server.url("/png"), LOCAL))
    assert decode_image_bytes(png, LOCAL).size == (8, 6)
    data = run(fetch_image_bytes(server.url("/jpeg"), LOCAL))
    assert data[:2] == b"\xff\xd8"


def test_fetch_http_errors_and_non_images(server: LocalServer) -> None:
    assert fetch_error(server.url("/missing")) == "HTTP status 404"
    html = run(fetch_image_bytes(server.url("/html"), LOCAL))  # fetching is content-agnostic
    with pytest.raises(ImageError, match="^not a decodable image$"):
        decode_image_bytes(html, LOCAL)


def test_loopback_refused_unless_allowed(server: LocalServer) -> None:
    message = fetch_error(server.url("/png"), ImageLimits())
    assert message.startswith("refused address 127.0.0.1 (loopback)")
    assert "IMAGE_ALLOW_PRIVATE_URLS" in message
    # By name: the resolver only offers non-public answers, so nothing is connectable.
    message = fetch_error(server.url("/png", host="localhost"), ImageLimits())
    assert message.startswith("refused address ") and "(loopback)" in message
    assert run(fetch_image_bytes(server.url("/png", host="localhost"), LOCAL))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "http://169.254.169.254/latest/meta-data/",
            "refused address 169.254.169.254 (link-local)",
        ),
        ("http://10.1.2.3/x.png", "refused address 10.1.2.3 (private)"),
        ("http://[::1]:9/x.png", "refused address ::1 (loopback)"),
        ("http://[::ffff:169.254.169.254]/", "(link-local)"),
        ("http://0.0.0.0:9/x.png", "refused address 0.0.0.0 (unspecified)"),
        ("ftp://example.com/x.png", "unsupported URL scheme 'ftp', only http and https"),
        ("file:///etc/passwd", "unsupported URL scheme 'file', only http and https"),
        ("gopher://127.0.0.1:6379/_INFO", "unsupported URL scheme 'gopher'"),
        ("/relative/path.png", "unsupported URL scheme '(none)'"),
        ("http:///no-host", "invalid URL"),
    ],
)
def test_refused_without_network_traffic(url: str, expected: str, connect_calls: list[str]) -> None:
    assert expected in fetch_error(url, ImageLimits())
    with pytest.raises(ImageInputError) as info:
        run(load_images([ImageSource(url=url)], ImageLimits()))
    assert expected in info.value.reason and info.value.index == 0
    assert connect_calls == []


def test_guarded_session_fetches_public_addresses(
    server: LocalServer, loopback_is_public: None, connect_calls: list[str]
) -> None:
    # Resolver drops ::1 (still non-public), keeps 127.0.0.1; socket factory lets it through.
    data = run(fetch_image_bytes(server.url("/png", host="localhost"), ImageLimits()))
    assert data.startswith(b"\x89PNG")
    assert connect_calls == [f"localhost:{server.port}"]


def test_socket_factory_refuses_rebound_answers(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulate DNS rebinding past the resolver: it now returns private answers unfiltered.
    async def unfiltered(self: Any, host: str, port: int = 0, family: Any = 0) -> Any:
        return await self._inner.resolve(host, port, family)

    monkeypatch.setattr(images._PublicOnlyResolver, "resolve", unfiltered)
    message = fetch_error(server.url("/png", host="localhost"), ImageLimits())
    assert message.startswith("refused address ") and "(loopback)" in message


def test_peer_check_with_unguarded_session(server: LocalServer) -> None:
    # A caller-supplied plain session has no resolver/socket guards; the peer check (while
    # the body is still streaming) must still refuse the loopback connection.
    async def go() -> None:
        async with aiohttp.ClientSession() as plain:
            await fetch_image_bytes(server.url("/drip", host="localhost"), ImageLimits(), plain)

    with pytest.raises(ImageError, match=r"^refused address 127\.0\.0\.1 \(loopback\)"):
        run(go())


def test_resolver_drops_non_public_answers() -> None:
    class FakeInner:
        def __init__(self, hosts: list[str]) -> None:
            self.hosts = hosts

        async def resolve(self, host: str, port: int = 0, family: Any = 0) -> list[Any]:
            return [{"hostname": host, "host": h, "port": port} for h in self.hosts]

    async def resolve(hosts: list[str]) -> list[str]:
        resolver = images._PublicOnlyResolver()
        resolver._inner = FakeInner(hosts)  # type: ignore[assignment]
        return [r["host"] for r in await resolver.resolve("rebind.example", 80)]

    assert run(resolve(["10.0.0.1", "93.184.216.34", "::1"])) == ["93.184.216.34"]
    with pytest.raises(OSError, match=r"refused address 10\.0\.0\.1 \(private\)"):
        run(resolve(["10.0.0.1", "169.254.169.254"]))


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("10.0.0.1", "private"),
        ("192.168.1.1", "private"),
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.100.100.200", "not globally routable"),
        ("::1", "loopback"),
        ("fe80::1%eth0", "link-local"),
        ("fc00::1", "private"),
        ("::ffff:169.254.169.254", "link-local"),
        ("::ffff:10.0.0.1", "private"),
        ("2002:a00:1::", "private"),  # 6to4 of 10.0.0.1
        ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_refusal_reason(ip: str, reason: str | None) -> None:
    assert images._refusal_reason(ip) == reason


def test_redirects_are_bounded(server: LocalServer) -> None:
    limits = ImageLimits(allow_private=True, max_redirects=3)
    assert run(fetch_image_bytes(server.url("/redirect/3"), limits)).startswith(b"\x89PNG")
    expected = "too many redirects, limit IMAGE_MAX_REDIRECTS=3"
    assert fetch_error(server.url("/redirect/4"), limits) == expected
    no_redirects = ImageLimits(allow_private=True, max_redirects=0)
    assert "IMAGE_MAX_REDIRECTS=0" in fetch_error(server.url("/redirect/1"), no_redirects)
    assert run(fetch_image_bytes(server.url("/relative-redirect"), LOCAL)).startswith(b"\x89PNG")


def test_each_redirect_hop_is_revalidated(
    server: LocalServer, loopback_is_public: None, connect_calls: list[str]
) -> None:
    def via(target: str) -> str:
        return server.url(f"/redirect-to?target={target}")

    metadata = via("http://169.254.169.254/latest/meta-data/")
    assert fetch_error(metadata, ImageLimits()).startswith(
        "refused address 169.254.169.254 (link-local)"
    )
    assert connect_calls == [f"127.0.0.1:{server.port}"]  # never connected to the target
    assert "scheme 'file'" in fetch_error(via("file:///etc/passwd"), ImageLimits())
    assert "scheme 'ftp'" in fetch_error(via("ftp://127.0.0.1/x"), ImageLimits())


def test_total_timeout(server: LocalServer) -> None:
    limits = ImageLimits(allow_private=True, fetch_timeout_s=0.3)
    expected = "fetch timed out after 0.3s, limit IMAGE_FETCH_TIMEOUT_S=0.3"
    start = time.monotonic()
    assert fetch_error(server.url("/slow?ms=3000"), limits) == expected  # slow headers
    assert fetch_error(server.url("/drip"), limits) == expected  # slow body, steady bytes
    assert time.monotonic() - start < 2.0


def test_byte_cap_while_streaming(server: LocalServer) -> None:
    limits = ImageLimits(allow_private=True, max_bytes=256 * 1024)
    start = time.monotonic()
    message = fetch_error(server.url("/big-stream"), limits)
    assert message == "image is over 262144 bytes, limit IMAGE_MAX_BYTES=262144"
    assert time.monotonic() - start < 2.0
    time.sleep(0.1)  # let the server notice the hang-up
    assert server.big_stream_sent < BIG_STREAM_TOTAL  # we stopped reading, not drained


def test_byte_cap_from_content_length(server: LocalServer) -> None:
    limits = ImageLimits(allow_private=True, max_bytes=100_000)
    start = time.monotonic()
    message = fetch_error(server.url("/lying-length"), limits)
    assert message == "image is 1000000000 bytes, limit IMAGE_MAX_BYTES=100000"
    assert time.monotonic() - start < 1.0  # refused from the header, no trickle waited for
    assert "image is 100001 bytes" in fetch_error(server.url("/sized?n=100001"), limits)
    assert len(run(fetch_image_bytes(server.url("/sized?n=100000"), limits))) == 100_000


def test_caller_session_is_left_open(server: LocalServer) -> None:
    async def go() -> bool:
        async with images.create_session(LOCAL) as session:
            await fetch_image_bytes(server.url("/png"), LOCAL, session)
            await fetch_image_bytes(server.url("/jpeg"), LOCAL, session)
            return session.closed

    assert run(go()) is False


# --------------------------------------------------------------------------- load_images


def test_load_images_preserves_order_and_runs_concurrently(server: LocalServer) -> None:
    # Later items finish first; results must still come back in input order.
    n = 8
    sources = [ImageSource(url=server.url(f"/slow?ms={400 - 40 * i}&w={i + 1}")) for i in range(n)]
    start = time.monotonic()
    result = run(load_images(sources, LOCAL))
    elapsed = time.monotonic() - start
    assert [im.size[0] for im in result] == list(range(1, n + 1))
    assert elapsed < 1.5, elapsed  # sequential would take 2.08 s


def test_load_images_concurrency_is_bounded(server: LocalServer) -> None:
    limits = ImageLimits(allow_private=True, max_concurrency=2)
    start = time.monotonic()
    run(load_images([ImageSource(url=server.url("/slow?ms=200"))] * 4, limits))
    assert time.monotonic() - start >= 0.38  # two waves of 0.2 s


def test_load_images_mixed_sources(server: LocalServer) -> None:
    sources = [
        ImageSource(url=server.url("/png")),
        ImageSource(content=b64(png_bytes(width=5))),
        ImageSource(url="data:image/jpeg;base64," + b64(jpeg_bytes(width=7))),
        ImageSource(url=server.url("/jpeg")),
        ImageSource(url=server.url("/redirect/2")),
    ]
    result = run(load_images(sources, LOCAL))
    assert [im.size[0] for im in result] == [8, 5, 7, 8, 3]
    assert all(im.mode == "RGB" for im in result)
    assert run(load_images([], LOCAL)) == []


def test_load_images_reports_lowest_failing_index(server: LocalServer) -> None:
    sources = [
        ImageSource(url=server.url("/png")),
        ImageSource(url=server.url("/slow?ms=200&status=404")),  # fails last...
        ImageSource(content="@@@@"),  # ...but this one fails first
        ImageSource(url=server.url("/html")),
    ]
    with pytest.raises(ImageInputError) as info:
        run(load_images(sources, LOCAL))
    assert (info.value.index, info.value.reason) == (1, "HTTP status 404")
    assert str(info.value) == "image 1: HTTP status 404"


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        (ImageSource(), "image needs exactly one of 'url' or 'content'"),
        (ImageSource(url="http://x", content="x"), "image needs exactly one of 'url' or 'content'"),
        (ImageSource(content=b64(b"<html></html>")), "not a decodable image"),
        (ImageSource(url="data:text/plain;base64,aGk="), "image/* media type"),
    ],
)
def test_load_images_bad_sources(source: ImageSource, reason: str) -> None:
    with pytest.raises(ImageInputError) as info:
        run(load_images([ImageSource(content=b64(png_bytes())), source], LOCAL))
    assert info.value.index == 1 and reason in info.value.reason


def test_load_images_closes_its_session(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions: list[aiohttp.ClientSession] = []
    original: Callable[[ImageLimits], aiohttp.ClientSession] = images.create_session

    def capture(limits: ImageLimits) -> aiohttp.ClientSession:
        sessions.append(original(limits))
        return sessions[-1]

    monkeypatch.setattr(images, "create_session", capture)
    run(load_images([ImageSource(url=server.url("/png"))], LOCAL))
    with pytest.raises(ImageInputError):
        run(load_images([ImageSource(url=server.url("/missing"))], LOCAL))
    run(load_images([ImageSource(content=b64(png_bytes()))], LOCAL))  # no http: no session
    assert len(sessions) == 2 and all(s.closed for s in sessions)


# --------------------------------------------------------------------------- decoding


def test_pixel_cap_checked_before_decoding() -> None:
    limits = ImageLimits(max_pixels=100)
    assert decode_image_bytes(png_bytes(10, 10), limits).size == (10, 10)
    with pytest.raises(ImageError) as info:
        decode_image_bytes(png_bytes(10, 11), limits)
    assert str(info.value) == "image is 10x11 (110 pixels), limit IMAGE_MAX_PIXELS=100"
    # Declared 8000x8000 with no pixel data: refused from the header alone (decoding it
    # would fail differently).
    with pytest.raises(ImageError, match=r"^image is 8000x8000 \(64000000 pixels\)"):
        decode_image_bytes(png_header_only(8000, 8000), ImageLimits())


def test_decompression_bombs(server: LocalServer) -> None:
    # A real bomb: 1-bit 9000x9000 compresses to a few KB (and stays under Pillow's warning).
    buf = io.BytesIO()
    Image.new("1", (9000, 9000), 0).save(buf, "PNG")
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(ImageError, match=r"^image is 9000x9000 .*IMAGE_MAX_PIXELS=50000000$"):
        decode_image_bytes(buf.getvalue(), ImageLimits())
    # Past Pillow's own guard (which fires inside Image.open): same kind of message.
    bomb = run(fetch_image_bytes(server.url("/bomb"), LOCAL))
    with pytest.raises(ImageError, match=r"^image has over \d+ pixels, limit IMAGE_MAX_PIXELS="):
        decode_image_bytes(bomb, ImageLimits())


@pytest.mark.parametrize(
    "data",
    [
        b"hello, not an image",
        b"<!doctype html><html><body>x</body></html>",
        png_bytes()[:40],  # truncated
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",  # no Ghostscript
    ],
)
def test_not_decodable(data: bytes) -> None:
    with pytest.raises(ImageError, match="^not a decodable image$"):
        decode_image_bytes(data, ImageLimits())


def test_decode_byte_cap_and_empty() -> None:
    with pytest.raises(ImageError, match="^image is 2000 bytes, limit IMAGE_MAX_BYTES=1000$"):
        decode_image_bytes(b"\0" * 2000, ImageLimits(max_bytes=1000))
    with pytest.raises(ImageError, match="^empty image$"):
        decode_image_bytes(b"", ImageLimits())


def test_exif_orientation_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    im = decode_image_bytes(jpeg_bytes(20, 10, exif=exif), ImageLimits())
    assert im.size == (10, 20)


def _encoded(im: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_modes_normalised_to_rgb() -> None:
    limits = ImageLimits()

    def decode(im: Image.Image, fmt: str = "PNG", **kw: Any) -> Image.Image:
        out = decode_image_bytes(_encoded(im, fmt, **kw), limits)
        assert out.mode == "RGB"
        return out

    # Transparency is composited onto white.
    assert decode(Image.new("RGBA", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    r, g, b = decode(Image.new("RGBA", (2, 2), (255, 0, 0, 128))).getpixel((0, 0))  # type: ignore[misc]
    assert r == 255 and 120 < g < 135 and g == b
    assert decode(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    assert decode(palette, "GIF", transparency=0).getpixel((0, 0)) == (255, 255, 255)
    # Opaque modes.
    assert decode(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert decode(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)
    cmyk = decode(Image.new("CMYK", (2, 2), (0, 255, 255, 0)), "JPEG")
    r, g, b = cmyk.getpixel((0, 0))  # type: ignore[misc]
    assert r > 200 and g < 60 and b < 60
    # 16-bit greyscale is scaled, not clipped to white.
    assert decode(Image.new("I;16", (2, 2), 32768)).getpixel((0, 0)) == (128, 128, 128)
    assert decode(Image.new("I;16", (2, 2), 65535)).getpixel((0, 0)) == (255, 255, 255)
    assert decode(Image.new("RGB", (3, 2), (1, 2, 3)), "WEBP", lossless=True).size == (3, 2)


# --------------------------------------------------------------------------- base64


def test_base64_variants() -> None:
    data = png_bytes(width=9)
    limits = ImageLimits()
    assert decode_base64(b64(data), limits).size == (9, 6)
    assert decode_base64(base64.encodebytes(data).decode(), limits).size == (9, 6)  # newlines
    urlsafe = base64.urlsafe_b64encode(data).decode().rstrip("=")
    assert decode_base64(urlsafe, limits).size == (9, 6)
    assert decode_base64("data:image/png;base64," + b64(data), limits).size == (9, 6)


@pytest.mark.parametrize(
    ("content", "limits", "message"),
    [
        ("@@@@", ImageLimits(), "^invalid base64$"),
        ("ÿÿÿÿ", ImageLimits(), "^invalid base64$"),
        ("abcde", ImageLimits(), "^invalid base64$"),
        ("   \n", ImageLimits(), "^empty image content$"),
        (b64(b"plain text, not an image"), ImageLimits(), "^not a decodable image$"),
        (b64(b"\0" * 1100), ImageLimits(max_bytes=1000), "^image is 1100 bytes, limit "),
        ("A" * 10_000_000, ImageLimits(max_bytes=1000), "^image is over 1000 bytes, limit "),
    ],
)
def test_base64_rejects(content: str, limits: ImageLimits, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode_base64(content, limits)


def test_data_urls() -> None:
    payload = b64(png_bytes(width=4))
    limits = ImageLimits()
    assert decode_data_url("data:image/png;base64," + payload, limits).size == (4, 6)
    assert decode_data_url("DATA:IMAGE/PNG;BASE64," + payload, limits).size == (4, 6)
    # The declared subtype is a hint only: Pillow sniffs the real format.
    assert decode_data_url("data:image/jpeg;name=x.png;base64," + payload, limits).size == (4, 6)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:text/plain;base64,aGk=", "image/\\* media type, got 'text/plain'"),
        ("data:;base64,aGk=", "image/\\* media type"),
        ("data:image/;base64,aGk=", "image/\\* media type"),
        ("data:image/png,rawbytes", "must be base64-encoded"),
        ("data:image/png;base64", "missing ','"),
        ("data:image/png;base64,@@@@", "^invalid base64$"),
        ("data:image/png;base64," + b64(b"<svg/>"), "^not a decodable image$"),
        ("https://example.com/x.png", "^not a data: URL$"),
    ],
)
def test_data_url_rejects(url: str, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode_data_url(url, ImageLimits())


def test_limits_validated() -> None:
    with pytest.raises(ValueError):
        ImageLimits(max_bytes=0)
    with pytest.raises(ValueError):
        ImageLimits(max_redirects=-1)
