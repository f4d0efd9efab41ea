"""`make push`, `make watch` and `make watch-attach` run the pinned truss CLI with flags it has.

Offline, and in a HOME without ~/.trussrc, the CLI reads and validates the package's config
(a broken one fails there, with its own message) and stops at "No remote configured": as far
as a push gets without a Baseten account. `-o .venv/.installed` keeps make from (re)building
the venv the tests run in.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tools.local_server import ROOT

NO_REMOTE = "No remote configured"


def make(target: str, model: str | Path, home: Path) -> subprocess.CompletedProcess[str]:
    settings = home / ".config" / "truss" / "settings.toml"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text("check_for_updates = false\n")  # no PyPI version check from a test
    env = {**os.environ, "HOME": str(home), "COLUMNS": "200"}
    return subprocess.run(
        ["make", "--no-print-directory", "-o", ".venv/.installed", target, f"MODEL={model}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("target", "says", "never"),
    [
        # Published is the default; the deprecated --publish is not passed.
        ("push", "Deploying as a published deployment", "DEPRECATED"),
        # --watch: a development deployment (so no "published" line).
        ("watch", "truss push embedqa-1b-v2 --watch", "published deployment"),
        ("watch-attach", "truss watch embedqa-1b-v2", "published deployment"),
    ],
)
def test_make_targets_reach_the_remote(tmp_path: Path, target: str, says: str, never: str):
    out = make(target, "embedqa-1b-v2", tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and NO_REMOTE in text, text[-3000:]
    assert says in text and never not in text, text[-3000:]


def test_push_validates_the_config_first(tmp_path: Path) -> None:
    """The stop at the remote comes after the config was read: a bad config fails before."""
    package = tmp_path / "pkg" / "embedqa-1b-v2"
    shutil.copytree(ROOT / "embedqa-1b-v2", package)
    shutil.copytree(ROOT / "shared", tmp_path / "pkg" / "shared")  # its external_package_dirs
    config = package / "config.yaml"
    config.write_text(config.read_text().replace("accelerator: L4", "accelerator: NOPE"))
    out = make("push", package, tmp_path / "home")
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "Unsupported accelerator type: `NOPE`" in text, text[-3000:]
    assert NO_REMOTE not in text
