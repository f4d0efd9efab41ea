"""Write a tiny random-weight checkpoint in a package's official layout.

python tools/make_checkpoint.py embedqa-1b-v2 OUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "shared"))


def writers() -> dict[str, Callable[[Path, int], None]]:
    from embed_serving.models import colembed, nvembed
    from embed_serving.tiny import write_tiny_embedqa

    return {
        "embedqa-1b-v2": write_tiny_embedqa,
        "nv-embed-v2": nvembed.write_tiny_checkpoint,
        "colembed-3b": colembed.write_tiny_checkpoint,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="tiny random-weight checkpoint")
    parser.add_argument("model", choices=["embedqa-1b-v2", "nv-embed-v2", "colembed-3b"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    writers()[args.model](args.out, args.seed)
    print(f"wrote a tiny RANDOM-weight {args.model} checkpoint to {args.out}")


if __name__ == "__main__":
    main()
