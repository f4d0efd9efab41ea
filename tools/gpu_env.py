"""Run a script on a bare GPU machine with what it lacks taken from wheels/gpu (`make bench-gpu`).

The machine has a Python with its own torch (and usually tokenizers, safetensors, pillow) but
no network, maybe no pip, maybe no venv module. So nothing is installed system-wide and nothing
is resolved online: each distribution in wheels/gpu/requirements.txt (written by
`make gpu-wheels`) is taken from the machine when it has it at a version that every other
chosen distribution accepts (transformers must be 5.x), else its wheel is unpacked into
build/gpu-site (a wheel is a zip; unpacking it is its installation). The script then runs with
build/gpu-site first on PYTHONPATH, so only what was taken from the wheels shadows anything.

Only the standard library is used here: nothing else can be assumed before this has run.

Usage: python3 tools/gpu_env.py [--wheels DIR] [--site DIR] SCRIPT [ARGS...]
"""

from __future__ import annotations

import argparse
import contextlib
import email.parser
import importlib.metadata as md
import os
import platform
import re
import shutil
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What our own code needs of a distribution the machine already has.
OWN_NEEDS = {"transformers": (5, 6)}  # major version range [5, 6)
_WHEEL = re.compile(
    r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$"
)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:4])


def _glibc() -> tuple[int, int]:
    name, version = platform.libc_ver()
    if name != "glibc":
        return (0, 0)
    major, minor = (int(x) for x in version.split(".")[:2])
    return major, minor


def wheel_fits(filename: str) -> bool:
    """Whether this interpreter can use the wheel (CPython, Linux x86_64, its glibc)."""
    m = _WHEEL.match(filename)
    if not m:
        return False
    ours = f"cp{sys.version_info.major}{sys.version_info.minor}"
    pys, abis, plats = (m[g].split(".") for g in ("py", "abi", "plat"))
    py_ok = any(p in ("py3", ours) or p == f"py{sys.version_info.major}" for p in pys)
    if "abi3" in abis:
        py_ok = any(p.startswith("cp3") and int(p[3:]) <= sys.version_info.minor for p in pys)
    abi_ok = any(a in ("none", "abi3", ours) for a in abis)
    glibc = _glibc()

    def plat_ok(p: str) -> bool:
        if p == "any":
            return True
        if p == "manylinux2014_x86_64":
            return glibc >= (2, 17)
        mm = re.match(r"manylinux_(\d+)_(\d+)_x86_64$", p)
        return bool(mm) and glibc >= (int(mm[1]), int(mm[2])) and platform.machine() == "x86_64"

    return py_ok and abi_ok and any(plat_ok(p) for p in plats)


class Wheels:
    def __init__(self, folder: Path) -> None:
        self.files: dict[str, Path] = {}
        for path in sorted(folder.glob("*.whl")):
            m = _WHEEL.match(path.name)
            if m and wheel_fits(path.name):
                self.files.setdefault(canonical(m["name"]), path)

    def metadata(self, name: str) -> email.message.Message:
        with zipfile.ZipFile(self.files[name]) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            return email.parser.Parser().parsestr(z.read(meta).decode("utf-8"))


def _requires(meta: email.message.Message | md.PackageMetadata) -> list[tuple[str, str]]:
    """(name, specifier) of the unconditional requirements (extras and other platforms off)."""
    out = []
    for line in meta.get_all("Requires-Dist") or []:
        spec, _, marker = line.partition(";")
        if marker.strip() and not _marker_true(marker):
            continue
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*\(?([^)]*)\)?", spec)
        if m:
            out.append((canonical(m[1]), m[3].strip()))
    return out


def _marker_true(marker: str) -> bool:
    """Enough of PEP 508 for these packages: extras are never wanted; `python_version` clauses
    joined by `and` are evaluated; anything else (platform clauses, `or`) is taken as true,
    which at worst checks one requirement too many."""
    if "extra" in marker:
        return False
    if " or " in marker:
        return True
    here = (sys.version_info.major, sys.version_info.minor)
    for clause in marker.split(" and "):
        m = re.match(r"\s*\(?\s*python_version\s*(==|!=|<=|>=|<|>)\s*['\"]([^'\"]*)['\"]", clause)
        if m and not _compare(here, m[1], _version_tuple(m[2])):
            return False
    return True


def _compare(a: tuple[int, ...], op: str, b: tuple[int, ...]) -> bool:
    n = max(len(a), len(b))
    a, b = a + (0,) * (n - len(a)), b + (0,) * (n - len(b))
    return {
        "==": a == b,
        "!=": a != b,
        "<=": a <= b,
        ">=": a >= b,
        "<": a < b,
        ">": a > b,
    }[op]


def satisfies(version: str, specifier: str) -> bool:
    """Version against a comma-separated specifier (==, !=, <=, >=, <, >, ~=, wildcards)."""
    v = _version_tuple(version)
    for part in filter(None, (p.strip() for p in specifier.split(","))):
        m = re.match(r"(===|~=|==|!=|<=|>=|<|>)\s*(.+)$", part)
        if not m:
            continue
        op, target = m[1], m[2]
        if target.endswith(".*"):
            prefix = _version_tuple(target[:-2])
            same = v[: len(prefix)] == prefix
            if (op == "==" and not same) or (op == "!=" and same):
                return False
            continue
        t = _version_tuple(target)
        if op == "~=":
            if not (v >= t and v[: len(t) - 1] == t[: len(t) - 1]):
                return False
        elif op == "===":
            if version != target:
                return False
        elif not _compare(v, op, t):
            return False
    return True


def plan(pins: dict[str, str], wheels: Wheels) -> dict[str, str]:
    """{name: 'system' | 'wheel'} for every pinned distribution."""
    system: dict[str, str] = {}
    for name in pins:
        with contextlib.suppress(md.PackageNotFoundError):
            system[name] = md.version(name)
    choice = {n: "system" if n in system else "wheel" for n in pins}
    for name, (low, high) in OWN_NEEDS.items():
        if name in system and not low <= _version_tuple(system[name])[0] < high:
            choice[name] = "wheel"
    for _ in range(len(pins) + 1):  # each round moves at least one name to its wheel
        changed = False
        for name, where in list(choice.items()):
            meta = md.metadata(name) if where == "system" else wheels.metadata(name)
            for dep, spec in _requires(meta):
                if dep not in choice:
                    continue
                version = system[dep] if choice[dep] == "system" else pins[dep]
                if not satisfies(version, spec):
                    # Prefer replacing the dependency; if our pin cannot satisfy it either,
                    # the requirer itself must come from the wheels (whose pins agree).
                    if choice[dep] == "system" and satisfies(pins[dep], spec):
                        choice[dep] = "wheel"
                    elif where == "system":
                        choice[name] = "wheel"
                    else:
                        continue
                    changed = True
        if not changed:
            break
    return choice


def unpack(wheel: Path, site: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    # Files a wheel ships under <name>.data/{purelib,platlib} belong in the site itself.
    for data in site.glob("*.data"):
        for kind in ("purelib", "platlib"):
            folder = data / kind
            if folder.is_dir():
                for item in folder.iterdir():
                    shutil.move(str(item), site / item.name)
        shutil.rmtree(data)


def prepare(wheels_dir: Path, site: Path) -> dict[str, str]:
    req_file = wheels_dir / "requirements.txt"
    if not req_file.is_file():
        # The machine may have everything already; if not, the import error says what is
        # missing and this says where it should have come from.
        print(
            f"gpu_env: {req_file} is missing, running with this Python's own packages (run "
            "`make gpu-wheels` on a machine with network and copy wheels/gpu with the checkout "
            "if anything is missing; README, GPU)",
            file=sys.stderr,
        )
        return {}
    pins = {}
    for line in req_file.read_text(encoding="utf-8").split():
        name, _, version = line.partition("==")
        pins[canonical(name)] = version
    wheels = Wheels(wheels_dir)
    choice = {n: "system" for n in pins}
    # A distribution with no fitting wheel must be on the machine already.
    missing = [n for n in pins if n not in wheels.files]
    for name in missing:
        try:
            md.version(name)
        except md.PackageNotFoundError:
            raise SystemExit(
                f"{name} is neither installed nor in {wheels_dir} as a wheel for this Python "
                f"({sys.version.split()[0]}, glibc {'.'.join(map(str, _glibc()))})"
            ) from None
    present = {n: v for n, v in pins.items() if n in wheels.files}
    choice.update(plan(present, wheels))
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    for name, where in sorted(choice.items()):
        if where == "wheel":
            unpack(wheels.files[name], site)
    taken = sorted(n for n, w in choice.items() if w == "wheel")
    print(f"gpu_env: from {wheels_dir}: {', '.join(taken) or 'nothing'}", file=sys.stderr)
    return choice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheels", type=Path, default=ROOT / "wheels" / "gpu")
    parser.add_argument("--site", type=Path, default=ROOT / "build" / "gpu-site")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    prepare(args.wheels, args.site)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(args.site), str(ROOT / "shared"), str(ROOT), env.get("PYTHONPATH", "")]
    ).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")  # never try the network
    argv = [sys.executable, args.script, *args.args]
    os.execve(sys.executable, argv, env)


if __name__ == "__main__":
    main()
