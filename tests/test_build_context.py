"""What `truss push` builds, tested as built, and every entry point ends on a failed load.

Each package is built the way a push is: `TrussHandle.gather()` (what `truss push` uploads),
then the image's build context by Truss's own `ServingImageBuilderContext` (what Baseten's
builder runs), then the image's file system by Truss's `DockerBuildEmulator` (the COPY lines
of the generated Dockerfile; RUN lines are not run, so nothing is installed: the interpreter
is this venv's, the stand-in for the image's pip install of the context's requirements.txt).

Offline, one call is stubbed: `truss_transfer.create_basetenpointer_from_models`, which asks
the Hugging Face hub for the pinned repo's file list to write the `model_cache` manifest. The
stub writes an empty manifest; the test puts a tiny checkpoint where the download would have
put the weights, `/app/model_cache/<volume_folder>` (truss.base.constants.MODEL_CACHE_PATH),
moved into tmp by `EMBED_MODEL_CACHE_DIR`.

The server is then started from the context alone, as the image's ENTRYPOINT does
(`python3 /app/main.py`): a fresh interpreter, cwd the context's app/, its packages/ as
/packages on the path, the config's environment_variables in the environment (Baseten sets
them at run time). Nothing from the source tree is on its path. Note that Truss's main.py
binds 0.0.0.0 (as in the image); the port is a free one, for the few seconds of a test.

"Within 10 s" for a failed load is measured from the start of the load (the model's
"load started" log line) to the end of the process. Before it, Truss's server imports the
model code, torch and transformers: a fixed cost of every start, no part of how a failed load
ends, and on a shared 2-core machine alone sometimes longer than 10 s. The whole run from the
process's start is bounded too (it used to hang until killed), by `HANG_S`.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
import truss
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tools.local_server import ROOT, end_process, free_port, wait_until_ok
from tools.make_checkpoint import writers

# Truss's gather uses a pathspec pattern class that pathspec deprecates (once per file).
pytestmark = pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")

PACKAGES = ["embedqa-1b-v2", "nv-embed-v2", "colembed-3b"]
TRUSS_TEMPLATES = Path(truss.__file__).parent / "templates"
DEADLINE_S = 10.0  # from the start of the load to the end of the process
HANG_S = 300.0  # from the start of the process: past it, the process is taken to hang


def build_context(package: str, out: Path) -> Path:
    """The image's file system for `package` (folder with app/ and packages/)."""
    import truss_transfer
    from truss.contexts.image_builder.serving_image_builder import ServingImageBuilderContext
    from truss.contexts.local_loader.docker_build_emulator import DockerBuildEmulator
    from truss.truss_handle.truss_handle import TrussHandle

    asked: list[str] = []

    def no_hub(models: list) -> str:
        # Stub of the Hugging Face metadata call (the file list of each model_cache repo):
        # there is no hub here, and the test puts the weights in place itself.
        asked.extend(m.repo_id for m in models)
        return json.dumps({"pointers": []})

    real = truss_transfer.create_basetenpointer_from_models
    truss_transfer.create_basetenpointer_from_models = no_hub
    try:
        gathered = Path(TrussHandle(ROOT / package).gather())
        image, fs = out / "image", out / "fs"
        image.mkdir(parents=True)
        ServingImageBuilderContext.run(gathered).prepare_image_build_dir(image)
    finally:
        truss_transfer.create_basetenpointer_from_models = real
    config = yaml.safe_load((ROOT / package / "config.yaml").read_text())
    assert asked == [repo["repo_id"] for repo in config["model_cache"]], "model_cache not built"
    # The Dockerfile's `RUN mkdir /static-bptr` (not run by the emulator) precedes its COPY.
    (fs / "static-bptr").mkdir(parents=True)
    DockerBuildEmulator(image / "Dockerfile", image).run(fs)
    return fs


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contexts")
    return {package: build_context(package, root / package) for package in PACKAGES}


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny checkpoints where Truss's model_cache puts each package's repo."""
    root = tmp_path_factory.mktemp("model_cache")
    for package in PACKAGES:
        (repo,) = yaml.safe_load((ROOT / package / "config.yaml").read_text())["model_cache"]
        writers()[package](root / repo["volume_folder"], 0)
    return root


class Process:
    """A server process and its log (Truss logs one JSON object per line)."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)  # fmt: skip

    def wait_exit(self, timeout: float = HANG_S) -> tuple[int, float]:
        """Exit status, and the epoch time the process was seen ended."""
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            self.stop()
        return rc, time.time()

    def wait_ready(self, url: str, timeout: float = 300) -> None:
        ready = wait_until_ok(self.proc, f"{url}/v1/models/model", timeout, self.tail)
        assert ready, f"not ready in {timeout} s:\n{self.tail()}"

    def records(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and "message" in record:
                out.append(record)
            elif line.strip():
                out.append({"message": line})
        return out

    def messages(self) -> list[str]:
        return [str(r["message"]) for r in self.records()]

    def tail(self) -> str:
        return self.log_path.read_text()[-4000:]

    def stop(self) -> None:
        end_process(self.proc)
        self._log.close()


def image_env(fs: Path, home: Path, cache: Path, port: int, **settings: str) -> dict[str, str]:
    """The environment the image's server gets: the config's settings, /packages on the path."""
    config = yaml.safe_load((fs / "app" / "config.yaml").read_text())
    env = {str(k): str(v) for k, v in (config.get("environment_variables") or {}).items()}
    env.update(
        PATH=os.environ["PATH"], HOME=str(home), PYTHONPATH=str(fs / "packages"),
        INFERENCE_SERVER_PORT=str(port), EMBED_MODEL_CACHE_DIR=str(cache),
        HF_HUB_OFFLINE="1",  # no hub here: a hub call fails at once instead of retrying
    )  # fmt: skip
    env.update(settings)
    return {k: v for k, v in env.items() if v is not None}


def start_image(fs: Path, tmp: Path, cache: Path, **settings: str) -> tuple[Process, str]:
    port = free_port()
    home = tmp / f"home-{port}"
    home.mkdir()
    env = image_env(fs, home, cache, port, **settings)
    proc = Process([sys.executable, "main.py"], fs / "app", env, tmp / f"server-{port}.log")
    return proc, f"http://127.0.0.1:{port}"


def assert_exits(proc: Process, *reason: str) -> None:
    rc, ended = proc.wait_exit()
    records = proc.records()
    assert rc != 0, f"exit status {rc}:\n{proc.tail()}"
    (started,) = [r for r in records if str(r["message"]).startswith("load started: ")]
    # Truss's log time: local time, milliseconds after a comma.
    began = datetime.strptime(started["asctime"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    took = ended - began
    print(f"{proc.log_path.name}: exit {rc}, {took:.1f} s after the load started")
    assert took <= DEADLINE_S, f"exited {took:.1f} s after the load started:\n{proc.tail()}"
    last = str(records[-1]["message"])
    assert last.startswith("model load failed, exiting: "), proc.tail()
    for part in reason:
        assert part in last, f"{part!r} not in the last log line: {last}"


# --- the build context serves -----------------------------------------------------------------


@pytest.mark.parametrize("package", PACKAGES)
def test_built_context_serves(contexts, model_cache, tmp_path, package: str) -> None:
    proc, url = start_image(contexts[package], tmp_path, model_cache, DEVICE="cpu")
    try:
        proc.wait_ready(url)
        body = {"queries": ["who wrote it"], "passages": ["a passage", "another one"],
                "compute_scores": True}  # fmt: skip
        r = httpx.post(f"{url}/v1/models/model:predict", json=body, timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()
        assert len(out["query_embeddings"]) == 1 and len(out["passage_embeddings"]) == 2
        scores = np.asarray(out["scores"], dtype=np.float64)
        assert scores.shape == (1, 2) and np.isfinite(scores).all()
        r = httpx.post(f"{url}/v1/embeddings", json={"input": ["x"], "input_type": "query"},
                       timeout=120)  # fmt: skip
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == 1
    finally:
        proc.stop()
    # The one load line: what runs, from where, on what (device, dtype, attention, versions).
    (line,) = [m for m in proc.messages() if m.startswith(f"loaded {package}: ")]
    assert str(model_cache) in line  # the weights were found where Truss puts them
    config = yaml.safe_load((ROOT / package / "config.yaml").read_text())
    (repo,) = config["model_cache"]
    assert f"{repo['repo_id']}@{repo['revision']}" in line
    for part in ("device cpu (", "dtype float32", "attention sdpa", "torch ", "CUDA ",
                 "driver ", "DEVICE=cpu"):  # fmt: skip
        assert part in line, (part, line)


@pytest.mark.parametrize("package", PACKAGES)
def test_context_installs_torch_cuda_build(contexts, package: str) -> None:
    """The config's index line reaches the requirements file the image installs with uv (which
    reads index options from it), so the image gets torch's CUDA 12.8 build."""
    fs = contexts[package]
    lines = (fs / "requirements.txt").read_text().splitlines()
    assert "--extra-index-url https://download.pytorch.org/whl/cu128" in lines
    assert [line for line in lines if line.startswith("torch")] == ["torch==2.13.0+cu128"]
    dockerfile = (fs.parent / "image" / "Dockerfile").read_text()
    assert "uv pip install --system" in dockerfile and "-r requirements.txt" in dockerfile


def test_context_imports_only_what_it_pins(contexts) -> None:
    """Every third-party module the bundled packages import belongs to a distribution that the
    context's requirements.txt installs (directly or as a dependency)."""
    fs = contexts["colembed-3b"]
    wanted: list[str] = []
    for line in (fs / "requirements.txt").read_text().splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith(("#", "-")):
            wanted.append(canonicalize_name(Requirement(line).name))
    installed: set[str] = set()
    while wanted:
        name = wanted.pop()
        if name in installed:
            continue
        installed.add(name)
        for spec in md.distribution(name).requires or []:
            req = Requirement(spec)
            if not req.marker or req.marker.evaluate({"extra": ""}):
                wanted.append(canonicalize_name(req.name))
    by_module = md.packages_distributions()
    outside = set()
    for path in (fs / "packages").rglob("*.py"):
        for module in required_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if module in sys.stdlib_module_names or module == "embed_serving":
                continue
            dists = {canonicalize_name(d) for d in by_module.get(module, [])}
            if not dists & installed:
                outside.add(f"{module} ({path.name})")
    assert not outside, f"imported, not installed by the context's requirements: {outside}"


def required_imports(node: ast.AST) -> set[str]:
    """Top-level modules imported, except under `try: ... except ImportError` (optional ones,
    such as flash_attn)."""
    if isinstance(node, ast.Import):
        return {a.name.split(".")[0] for a in node.names}
    if isinstance(node, ast.ImportFrom):
        return {node.module.split(".")[0]} if node.module and not node.level else set()
    children: list[ast.AST] = list(ast.iter_child_nodes(node))
    if isinstance(node, ast.Try):
        caught = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
        if caught & {"ImportError", "ModuleNotFoundError", "(ImportError, OSError)"}:
            children = [*node.handlers, *node.orelse, *node.finalbody]
    return set().union(*(required_imports(child) for child in children))


# --- a failed load ends the process, on every entry point --------------------------------------


def test_gpu_config_without_gpu_exits(contexts, model_cache, tmp_path) -> None:
    """On this CPU-only machine: the config asks for a GPU and DEVICE is not set."""
    proc, _ = start_image(contexts["embedqa-1b-v2"], tmp_path, model_cache)
    assert_exits(proc, "DeviceError", "asks for a GPU (resources.accelerator: L4)",
                 "CUDA cannot be used")  # fmt: skip


def test_corrupt_weights_exit(contexts, model_cache, tmp_path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(model_cache / "nv-embed-v2", cache / "nv-embed-v2")
    weights = cache / "nv-embed-v2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc, _ = start_image(contexts["nv-embed-v2"], tmp_path, cache, DEVICE="cpu")
    assert_exits(proc, "CheckpointError", f"cannot read {weights}", "deserializing")


def test_missing_weights_exit(contexts, tmp_path) -> None:
    # Nothing at the model_cache path and no hub: the load cannot find its weights.
    proc, _ = start_image(contexts["colembed-3b"], tmp_path, tmp_path / "empty", DEVICE="cpu")
    assert_exits(proc, "CheckpointError", "nvidia/llama-nemoretriever-colembed-3b-v1@",
                 f"not at {tmp_path / 'empty' / 'colembed-3b'} (model_cache)")  # fmt: skip


def test_bad_setting_exits_under_make_serve(tmp_path, model_cache) -> None:
    """`make serve` (tools/serve.py): a failed load ended in an AssertionError of Truss's
    shutdown task, and the process stayed up, never ready."""
    port = free_port()
    env = {**os.environ, "IMAGE_FETCH_TIMEOUT_S": "nan", "HOME": str(tmp_path)}
    args = [sys.executable, str(ROOT / "tools" / "serve.py"), "embedqa-1b-v2", "--port",
            str(port), "--checkpoint", str(model_cache / "embedqa-1b-v2"),
            "--build-dir", str(tmp_path / "build")]  # fmt: skip
    proc = Process(args, ROOT, env, tmp_path / "serve.log")
    assert_exits(proc, "SettingError", "IMAGE_FETCH_TIMEOUT_S=nan")


def test_make_serve_finds_weights_in_model_cache(tmp_path, model_cache) -> None:
    """Without CHECKPOINT, `make serve` loads from the model_cache path (it failed with
    "no model_cache in config.yaml": tools/serve.py moves model_cache under model_metadata)."""
    port = free_port()
    env = {**os.environ, "EMBED_MODEL_CACHE_DIR": str(model_cache), "HOME": str(tmp_path)}
    env.pop("EMBED_CHECKPOINT_DIR", None)
    env.pop("CHECKPOINT", None)
    args = [sys.executable, str(ROOT / "tools" / "serve.py"), "embedqa-1b-v2", "--port",
            str(port), "--build-dir", str(tmp_path / "build")]  # fmt: skip
    proc = Process(args, ROOT, env, tmp_path / "serve.log")
    try:
        proc.wait_ready(f"http://127.0.0.1:{port}")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": "x"}, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        proc.stop()
    assert any(str(model_cache / "embedqa-1b-v2") in m for m in proc.messages())


def test_failed_load_is_not_restarted_under_truss_watch(contexts, model_cache, tmp_path) -> None:
    """`truss watch` runs Truss's control server, which starts the inference server and
    restarts it when it dies, unless ~/inference_server_crashed.txt exists. Driven here by
    Truss's own InferenceServerProcessController, as the control server drives it."""
    fs = contexts["embedqa-1b-v2"]
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    env = image_env(fs, home, model_cache, port)  # no DEVICE: the GPU refusal
    driver = textwrap.dedent(f"""
        import json, logging, sys, time
        sys.path[:0] = [{str(TRUSS_TEMPLATES / "control" / "control")!r},
                        {str(TRUSS_TEMPLATES)!r}]
        from helpers.inference_server_process_controller import (
            InferenceServerProcessController,
        )
        logging.basicConfig(level=logging.INFO)
        env = json.loads(sys.argv[1])
        c = InferenceServerProcessController(
            {str(fs / "app")!r}, [sys.executable, {str(fs / "app" / "main.py")!r}],
            {port}, logging.getLogger("control"))
        c.start(env)
        rc = c._inference_server_process.wait(timeout={HANG_S})
        ended = time.time()
        c.check_and_recover_inference_server(env)  # what the control server runs every second
        restarted = c.is_inference_server_running()
        c.stop()
        print("RESULT", json.dumps({{"rc": rc, "ended": ended, "restarted": restarted}}))
    """)
    out = subprocess.run([sys.executable, "-c", driver, json.dumps(env)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=HANG_S + 60)  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["rc"] != 0
    logged = (out.stdout + out.stderr).splitlines()  # Truss's server logs to either
    records = [json.loads(line) for line in logged if line.startswith("{")]
    (started,) = [r for r in records if str(r.get("message")).startswith("load started: ")]
    began = datetime.strptime(started["asctime"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    took = result["ended"] - began
    print(f"truss watch: exit {result['rc']}, {took:.1f} s after the load started")
    assert took <= DEADLINE_S, (result, started)
    assert not result["restarted"], "the control server restarted a server whose load failed"
    assert "model load failed, exiting: DeviceError" in out.stdout + out.stderr
    assert "Inference server unrecoverable" in out.stderr
