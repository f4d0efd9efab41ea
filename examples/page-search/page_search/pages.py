"""The pages of a folder: every PDF page rendered with pypdfium2 and every image file, as the
PNG (or original JPEG/PNG) bytes sent to the server, each with a content hash.

A file that cannot be read (a corrupt PDF, a truncated image) raises `Unreadable` with the
reason; the indexer reports it and goes on with the other files.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pypdfium2 as pdfium
from PIL import Image, UnidentifiedImageError

PDF_SUFFIXES = frozenset({".pdf"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"})
# Formats the server decodes as they are; anything else is re-encoded to PNG.
_SENT_AS_IS = frozenset({"PNG", "JPEG"})


class Unreadable(Exception):
    """A file (or one of its pages) that cannot be decoded; the message says why."""


@dataclass(frozen=True)
class Source:
    path: Path
    rel: str  # path relative to the indexed folder, with '/' separators: what results show
    kind: str  # "pdf" or "image"


@dataclass(frozen=True)
class PageError:
    file: str
    page: int
    error: str


@dataclass(frozen=True)
class Page:
    file: str  # Source.rel
    page: int  # 1-based
    image: bytes  # what the server embeds
    sha256: str  # of `image`: the content hash resume compares


def find_sources(root: Path) -> list[Source]:
    """PDFs and images under `root` (or `root` itself when it is a file), in path order."""
    root = Path(root)
    if root.is_file():
        paths, base = [root], root.parent
    else:
        paths, base = sorted(p for p in root.rglob("*") if p.is_file()), root
    sources = []
    for path in paths:
        suffix = path.suffix.lower()
        kind = "pdf" if suffix in PDF_SUFFIXES else "image" if suffix in IMAGE_SUFFIXES else None
        if kind:
            sources.append(Source(path, path.relative_to(base).as_posix(), kind))
    return sources


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def page_count(source: Source) -> int:
    if source.kind == "image":
        return 1
    try:
        pdf = pdfium.PdfDocument(source.path)
    except pdfium.PdfiumError as e:
        raise Unreadable(f"not a readable PDF ({e})") from e
    try:
        return len(pdf)
    finally:
        pdf.close()


def render_pages(source: Source, pages: list[int], dpi: float) -> Iterator[Page | PageError]:
    """The given 1-based pages of `source`; a page that cannot be rendered is a `PageError`
    and the next one is tried. pdfium is not thread-safe: call this from one thread at a time
    (the indexer keeps one render thread)."""
    if source.kind == "image":
        if pages:
            yield _image_page(source)
        return
    try:
        pdf = pdfium.PdfDocument(source.path)
    except pdfium.PdfiumError as e:
        raise Unreadable(f"not a readable PDF ({e})") from e
    try:
        for number in pages:
            try:
                page = pdf[number - 1]
                try:
                    image = page.render(scale=dpi / 72).to_pil().convert("RGB")
                finally:
                    page.close()
            except pdfium.PdfiumError as e:
                yield PageError(source.rel, number, f"cannot be rendered ({e})")
                continue
            yield _page(source, number, _png(image))
    finally:
        pdf.close()


def _image_page(source: Source) -> Page:
    data = source.path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes every byte: a truncated file fails here, not on the server
            if image.format not in _SENT_AS_IS:
                data = _png(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise Unreadable(f"not a readable image ({e})") from e
    return _page(source, 1, data)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _page(source: Source, number: int, data: bytes) -> Page:
    return Page(source.rel, number, data, hashlib.sha256(data).hexdigest())
