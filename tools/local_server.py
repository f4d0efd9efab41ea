"""A package's real Truss server (`tools/serve.py`, what `make serve` runs) in a subprocess on
127.0.0.1: the tests' and the benchmarks' way to talk to the server exactly as a client would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ok(proc: subprocess.Popen, url: str, timeout: float, tail) -> bool:
    """Poll `url` until it answers 200 (True) or `timeout` passes (False); a process that ends
    first raises with the end of its log (`tail()`). One loop for every server the tests and
    benchmarks start (ours, from a built context, and the benchmark's peer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


def end_process(proc: subprocess.Popen) -> None:
    """SIGTERM (the server drains), then SIGKILL if it has not ended in 20 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


class TrussServer:
    """`tools/serve.py` in a subprocess: the package's own Truss server, as `make serve` runs it."""

    def __init__(
        self, package: str, checkpoint: Path | None, build_dir: Path, env: dict[str, str]
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = build_dir / f"{Path(package).name}-{self.port}.log"
        full_env = {**os.environ, **env}
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        weights = ["--checkpoint", str(checkpoint)] if checkpoint is not None else []
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tools" / "serve.py"), package, "--port", str(self.port),
             *weights, "--build-dir", str(build_dir / f"b{self.port}")],
            env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self._wait_ready(timeout=180)

    def _wait_ready(self, timeout: float) -> None:
        tail = lambda: self.log_path.read_text()[-4000:]  # noqa: E731
        if not wait_until_ok(self.proc, f"{self.url}/v1/models/model", timeout, tail):
            self.stop()
            raise RuntimeError(f"server not ready in {timeout}s:\n{tail()}")

    def predict(self, body: object, **kw: object) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/models/model:predict", json=body, timeout=120, **kw)

    def embeddings(self, body: object) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/embeddings", json=body, timeout=120)

    def stop(self) -> None:
        end_process(self.proc)
        self._log.close()
