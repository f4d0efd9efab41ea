"""Write a small folder of sample documents to try page-search on: multi-page PDFs (made with
Pillow's PDF writer, rendered back by pypdfium2 like any PDF), PNG and JPEG pages, and with
--corrupt one broken PDF and one truncated image, to see them reported and skipped.

    python make_samples.py DOCS_DIR [--pdfs 3] [--pages 3] [--images 2] [--corrupt]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

TOPICS = [
    "Quarterly revenue by region",
    "Operating income and net margin",
    "Employees at the Berlin office",
    "Response times across regions",
    "Model sizes and evaluation scores",
    "Invoice terms and payment dates",
    "Budget approved for fiscal 2024",
    "Experimental setup and results",
]


def page_image(title: str, number: int, size: tuple[int, int] = (850, 1100)) -> Image.Image:
    """A page with a title, body lines and a bar chart, different for each (title, number)."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    width, height = size
    draw.text((60, 50), f"{title} (page {number})", fill="black")
    for line in range(12):
        draw.text(
            (60, 110 + 22 * line),
            f"{title.lower()}: line {line + 1} of page {number}.",
            fill="black",
        )
    seed = sum(map(ord, title)) + 7 * number
    for bar in range(6):
        value = 40 + (seed * (bar + 3)) % 260
        x = 80 + bar * 110
        draw.rectangle([x, height - 120 - value, x + 70, height - 120], fill=(40 * bar, 90, 160))
    return image


def write_samples(
    out: Path, *, pdfs: int = 3, pages: int = 3, images: int = 2, corrupt: bool = False
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(pdfs):
        title = TOPICS[i % len(TOPICS)]
        rendered = [page_image(title, n + 1) for n in range(pages)]
        path = out / f"report-{i + 1}.pdf"
        rendered[0].save(path, save_all=True, append_images=rendered[1:], resolution=100)
        written.append(path)
    for i in range(images):
        title = TOPICS[(pdfs + i) % len(TOPICS)]
        path = out / f"scan-{i + 1}.{'png' if i % 2 == 0 else 'jpg'}"
        page_image(title, 1, (1100, 850)).save(path)
        written.append(path)
    if corrupt:
        broken_pdf = out / "broken.pdf"
        broken_pdf.write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\nthis is not a PDF\n")
        truncated = out / "truncated.png"
        truncated.write_bytes(written[-1].read_bytes()[:200] if images else b"\x89PNG\r\n")
        written += [broken_pdf, truncated]
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--pdfs", type=int, default=3)
    parser.add_argument("--pages", type=int, default=3)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--corrupt", action="store_true")
    args = parser.parse_args()
    paths = write_samples(
        args.out, pdfs=args.pdfs, pages=args.pages, images=args.images, corrupt=args.corrupt
    )
    print(f"wrote {len(paths)} files to {args.out}")


if __name__ == "__main__":
    main()
