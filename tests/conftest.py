"""Shared fixtures: real Truss servers (tools/serve.py) on 127.0.0.1 and tiny checkpoints."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT.parent / "shared" / "golden"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrussServer:
    """`tools/serve.py` in a subprocess: the package's own Truss server, as `make serve` runs it."""

    def __init__(self, package: str, checkpoint: Path, build_dir: Path, env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = build_dir / f"{package}-{self.port}.log"
        full_env = {**os.environ, **env}
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tools" / "serve.py"), package, "--port", str(self.port),
             "--checkpoint", str(checkpoint), "--build-dir", str(build_dir / f"b{self.port}")],
            env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self._wait_ready(timeout=180)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/v1/models/model", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.log_path.read_text()[-4000:]}")

    def predict(self, body: object, **kw: object) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/models/model:predict", json=body, timeout=120, **kw)

    def embeddings(self, body: object) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/embeddings", json=body, timeout=120)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


@pytest.fixture(scope="session")
def golden() -> Path:
    if not GOLDEN.is_dir():
        pytest.skip(f"golden fixtures not found at {GOLDEN} (they live beside the checkout)")
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
