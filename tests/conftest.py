"""Shared fixtures: real Truss servers (tools/serve.py) on 127.0.0.1 and tiny checkpoints."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tools.local_server import ROOT, TrussServer

# NVIDIA's reference outputs, part of the repository (tests/golden/README.md).
GOLDEN = ROOT / "tests" / "golden"


@pytest.fixture(scope="session")
def golden() -> Path:
    # Conformance is the project's proof: a missing fixture fails the suite, it never skips.
    if not GOLDEN.is_dir():
        pytest.fail(f"golden fixtures missing at {GOLDEN} (they are part of the repository)")
    return GOLDEN


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    servers: list[TrussServer] = []
    build_dir = tmp_path_factory.mktemp("servers")

    def start(package: str, checkpoint: Path, **env: str) -> TrussServer:
        server = TrussServer(package, checkpoint, build_dir, env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def assert_close(got: object, want: object, atol: float) -> None:
    got_a, want_a = np.asarray(got, dtype=np.float32), np.asarray(want, dtype=np.float32)
    assert got_a.shape == want_a.shape
    diff = float(np.abs(got_a - want_a).max())
    assert diff <= atol, f"max |diff| {diff} > {atol}"


# Golden-checkpoint fixtures for a test module that sets PACKAGE (a module may override them).
@pytest.fixture(scope="module")
def cases(golden: Path, request: pytest.FixtureRequest) -> dict:
    return json.loads((golden / request.module.PACKAGE / "cases.json").read_text())


@pytest.fixture(scope="module")
def server(golden: Path, start_server, request: pytest.FixtureRequest) -> TrussServer:
    package = request.module.PACKAGE
    return start_server(package, golden / package / "checkpoint")


@pytest.fixture(scope="module")
def server_48(golden: Path, start_server, request: pytest.FixtureRequest) -> TrussServer:
    # The golden truncating groups were cut at 48 tokens: the deployment setting does that.
    package = request.module.PACKAGE
    return start_server(package, golden / package / "checkpoint", MAX_INPUT_TOKENS="48")
