"""The CPU thread policy (shared/embed_serving/threads.py): the CPUs counted, the threads derived
from them, the settings that override them, and that OMP_WAIT_POLICY reaches OpenMP (it is read
once, when torch loads it; a fresh interpreter per case shows the order that matters)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from embed_serving import threads
from embed_serving.settings import SettingError

SHARED = Path(__file__).resolve().parents[1] / "shared"


@pytest.mark.parametrize(
    ("value", "cpus"),
    [(4, 4.0), ("4", 4.0), ("1.5", 1.5), ("500m", 0.5), (" 2 ", 2.0), (None, None), ("", None),
     ("lots", None), ("0", None), ("-1", None), ("nan", None), (True, None)],
)  # fmt: skip
def test_cpu_quantity(value: object, cpus: float | None) -> None:
    assert threads.parse_cpu_quantity(value) == cpus


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) is None


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) == 3.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # unlimited
    assert threads.cgroup_cpu_limit(tmp_path) is None
    assert threads.cgroup_cpu_limit(tmp_path / "nowhere") is None


def test_available_cpus_takes_the_fewest(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert threads.available_cpus(None, tmp_path) == affinity  # no quota, no config
    assert threads.available_cpus("1000", tmp_path) == affinity  # the config cannot add CPUs
    assert threads.available_cpus("500m", tmp_path) == 1  # a fraction still gets a thread
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert threads.available_cpus(None, tmp_path) == 1  # the quota, rounded up
    if affinity >= 2:
        (tmp_path / "cpu.max").write_text("150000 100000\n")
        assert threads.available_cpus(None, tmp_path) == 2
        assert threads.available_cpus("1", tmp_path) == 1


def test_plan_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TORCH_THREADS", "TORCH_INTEROP_THREADS", "TOKENIZERS_PARALLELISM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    cpu = threads.plan("cpu", 8)
    assert (cpu.intra_op, cpu.inter_op, cpu.wait_policy) == (8, 1, "passive")
    assert cpu.tokenizers_parallelism is False
    # On CUDA half the CPUs stay free for the event loop, the prepare pool and image decoding.
    assert threads.plan("cuda", 8).intra_op == 4
    assert threads.plan("cuda", 1).intra_op == 1


def test_plan_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_THREADS", "3")
    monkeypatch.setenv("TORCH_INTEROP_THREADS", "2")
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    policy = threads.plan("cpu", 8)
    assert (policy.intra_op, policy.inter_op, policy.wait_policy) == (3, 2, "active")
    assert policy.tokenizers_parallelism is True
    monkeypatch.setenv("TORCH_THREADS", "auto")
    assert threads.plan("cpu", 8).intra_op == 8


@pytest.mark.parametrize(
    ("name", "value"),
    [("TORCH_THREADS", "0"), ("TORCH_THREADS", "two"), ("TORCH_THREADS", "99999"),
     ("TORCH_INTEROP_THREADS", "-1"), ("OMP_WAIT_POLICY", "sometimes"),
     ("TOKENIZERS_PARALLELISM", "maybe")],
)  # fmt: skip
def test_bad_settings_name_themselves(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingError, match=name):
        threads.plan("cpu", 2)


def run_fresh(code: str, env: dict[str, str]) -> dict:
    """`code` in a fresh interpreter (OpenMP not yet loaded) with `env`; it prints a JSON."""
    base = {k: v for k, v in os.environ.items() if k not in threads.PROCESS_DEFAULTS}
    base.pop("TORCH_THREADS", None)
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(SHARED)!r})\n" + code],
        env={**base, "DEVICE": "cpu", **env}, capture_output=True, text=True, timeout=120,
        check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


APPLY = textwrap.dedent(
    """
    import json, logging, os, torch
    from embed_serving import threads
    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    threads.log.addHandler(handler)
    threads.log.setLevel(logging.INFO)
    policy = threads.apply({"resources": {"cpu": "1"}})
    print(json.dumps({
        "effective": threads.effective_wait_policy(),
        "threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
        "tokenizers": os.environ.get("TOKENIZERS_PARALLELISM"), "log": records,
    }))
    """
)


def test_applied_when_the_library_is_imported_first() -> None:
    """What a package does: `embed_serving` before torch. PASSIVE is in OpenMP's environment
    when torch loads it; torch gets the config's 1 CPU; no inter-op pool; no rayon pool."""
    got = run_fresh("import embed_serving\n" + APPLY, {})
    assert got["effective"] == "passive"
    assert (got["threads"], got["interop"], got["tokenizers"]) == (1, 1, "false")
    assert any("OMP_WAIT_POLICY=PASSIVE;" in line for line in got["log"]), got["log"]


def test_too_late_is_reported() -> None:
    """torch (and OpenMP) loaded before the library: setting the variable now cannot reach
    OpenMP, and the log line says so instead of claiming it."""
    got = run_fresh("import torch, embed_serving\n" + APPLY, {})
    assert got["effective"] == "unset"
    assert any("NOT in effect" in line for line in got["log"]), got["log"]


def test_the_environment_wins() -> None:
    """Set in the process's environment (config.yaml environment_variables): kept as given,
    whatever the import order."""
    got = run_fresh("import torch, embed_serving\n" + APPLY, {"OMP_WAIT_POLICY": "ACTIVE"})
    assert got["effective"] == "active"
    assert not any("NOT in effect" in line for line in got["log"]), got["log"]


def test_configs_set_the_policy_from_the_start() -> None:
    """Every package's config.yaml puts the policy in the container's environment, where
    OpenMP reads it whatever is imported first, and gives at least one CPU."""
    import yaml

    root = SHARED.parent
    for package in ("embedqa-1b-v2", "nv-embed-v2", "colembed-3b"):
        config = yaml.safe_load((root / package / "config.yaml").read_text())
        env = config["environment_variables"]
        assert env["OMP_WAIT_POLICY"] == "PASSIVE", package
        assert env["TOKENIZERS_PARALLELISM"] == "false", package
        assert math.ceil(threads.parse_cpu_quantity(config["resources"]["cpu"]) or 0) >= 1


def test_the_real_server_runs_the_policy(tmp_path: Path, start_server) -> None:
    """`make serve` / a deployment: the package's Truss server logs the policy at load, in
    effect (config.yaml's environment reached OpenMP), with torch sized to the replica's
    CPUs; and it serves."""
    from embed_serving.tiny import write_tiny_embedqa

    write_tiny_embedqa(tmp_path / "ck")
    server = start_server("embedqa-1b-v2", tmp_path / "ck", DEVICE="cpu")
    r = server.embeddings({"input": ["how do plants make energy?"]})
    assert r.status_code == 200, r.text
    lines = [line for line in server.log_path.read_text().splitlines() if "CPU threads" in line]
    assert len(lines) == 1, lines
    cpus = threads.available_cpus("4")  # embedqa-1b-v2/config.yaml: resources.cpu "4"
    assert f"{cpus} CPUs available; torch intra-op {cpus}, inter-op 1;" in lines[0]
    assert "OMP_WAIT_POLICY=PASSIVE;" in lines[0] and "NOT in effect" not in lines[0]
    assert "TOKENIZERS_PARALLELISM=false" in lines[0]
