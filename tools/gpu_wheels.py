"""Download the wheels `make bench-gpu` needs on a GPU machine without network (`make gpu-wheels`).

Run on a machine with network, from the repo's .venv. The list is derived, not hand-kept:
every third-party module that the shared library and the GPU benchmarks import, mapped to its
distribution, plus everything those require (Requires-Dist, without extras), pinned to the
versions in this .venv (= requirements-dev.lock). torch is left out: the GPU machine has its own
CUDA build, and nothing in the list requires it.

Writes wheels/gpu/requirements.txt and the wheels for CPython 3.11-3.13 on manylinux x86_64
(binary wheels only, so nothing is built on the GPU machine). wheels/ is not committed (tens of
MB): copy the folder with the checkout.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "shared" / "embed_serving", ROOT / "bench"]
# The GPU machine's own: never downloaded, never replaced.
EXCLUDE = {"torch", "triton"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
PYTHONS = ("3.11", "3.12", "3.13")


def imported_modules(paths: list[Path]) -> set[str]:
    names: set[str] = set()
    for folder in paths:
        for path in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
    return names


def closure(python: str = "3.12") -> dict[str, str]:
    """{distribution: version} of the imports' distributions and their requirements."""
    by_module = md.packages_distributions()
    todo = [d for m in sorted(imported_modules(SOURCES)) for d in by_module.get(m, [])]
    env = {**default_environment(), "python_version": python, "python_full_version": python}
    env.update(sys_platform="linux", platform_system="Linux", platform_machine="x86_64")
    env.update(os_name="posix", implementation_name="cpython")
    seen: dict[str, str] = {}
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen or name in EXCLUDE:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # a requirement for another platform / Python, not installed here
        seen[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
                todo.append(req.name)
    return dict(sorted(seen.items()))


def download(pins: list[str], python: str, dest: Path) -> bool:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    cmd += ["--only-binary=:all:", "--implementation", "cp", "--python-version", python]
    cmd += [*platforms, "-d", str(dest), *pins]
    return subprocess.run(cmd, stderr=subprocess.DEVNULL).returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dest", type=Path, default=ROOT / "wheels" / "gpu")
    parser.add_argument("--pythons", default=",".join(PYTHONS))
    parser.add_argument("--list", action="store_true", help="print the pinned list only")
    args = parser.parse_args()
    pins = [f"{name}=={version}" for name, version in closure().items()]
    if args.list:
        print("\n".join(pins))
        return
    args.dest.mkdir(parents=True, exist_ok=True)
    (args.dest / "requirements.txt").write_text("\n".join(pins) + "\n", encoding="utf-8")
    for python in args.pythons.split(","):
        print(f"wheels for CPython {python} -> {args.dest}", flush=True)
        if download(pins, python, args.dest):
            continue
        # Some pin has no wheel for this Python (numpy 1.26 stops at 3.12): fetch one by one,
        # and say which the GPU machine must bring itself.
        lacking = [pin for pin in pins if not download([pin], python, args.dest)]
        print(f"  no CPython {python} wheel for: {', '.join(lacking)}", flush=True)
    print(f"{len(pins)} distributions in {args.dest}; copy it with the checkout to the GPU box")


if __name__ == "__main__":
    main()
