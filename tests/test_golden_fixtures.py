"""The golden fixtures are in the repository, complete and unchanged (tests/golden/README.md):
a clone of the project alone must run every conformance test, so a file lost, replaced by a
git LFS pointer or converted to other line endings fails here, naming it."""

from __future__ import annotations

import hashlib

from conftest import GOLDEN

PACKAGES = ("embedqa-1b-v2", "nv-embed-v2", "colembed-3b")
NOT_FIXTURES = {"README.md", "SHA256SUMS"}


def _listed() -> dict[str, str]:
    lines = (GOLDEN / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split(maxsplit=1) for line in lines)}


def test_every_fixture_present_and_unchanged() -> None:
    listed = _listed()
    wrong = [
        name
        for name, digest in listed.items()
        if not (GOLDEN / name).is_file()
        or hashlib.sha256((GOLDEN / name).read_bytes()).hexdigest() != digest
    ]
    assert not wrong, f"golden fixtures missing or changed: {wrong}"


def test_every_fixture_listed() -> None:
    on_disk = {
        p.relative_to(GOLDEN).as_posix()
        for p in GOLDEN.rglob("*")
        if p.is_file() and p.name not in NOT_FIXTURES and "__pycache__" not in p.parts
    }
    assert on_disk == set(_listed()), "update tests/golden/SHA256SUMS and say where it came from"


def test_each_package_has_its_checkpoint_and_cases() -> None:
    # What the conformance tests open for each package, so a short SHA256SUMS cannot pass.
    listed = _listed()
    for package in PACKAGES:
        for name in ("cases.json", "GENERATED.md", "checkpoint/config.json",
                     "checkpoint/model.safetensors", "checkpoint/tokenizer.json"):  # fmt: skip
            assert f"{package}/{name}" in listed, f"{package}/{name}"
