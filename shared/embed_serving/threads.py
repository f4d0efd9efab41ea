"""The CPU thread policy: how many threads torch, OpenMP and the tokenizer may use, and how they
wait, derived from the CPUs this replica really has.

Left to their defaults, torch's OpenMP threads (one per CPU the machine shows, not per CPU the
container may use) spin for a while after every parallel region, burning the cores the event
loop, the prepare pool and the engine thread need; HF tokenizers starts its own pool of the same
size inside our prepare threads. Measured with infinity-emb side by side on a 2-core CPU, that
made our throughput swing between 0.24x and 1.5x the peer's.

The policy:

* CPUs = the fewest of: the CPUs this process may run on (`sched_getaffinity`), the cgroup's
  CPU quota (what a container is given, rounded up), and `resources.cpu` of config.yaml.
* intra-op threads (`TORCH_THREADS`, default auto): on the CPU, all of them (the forward pass
  is the work); on CUDA, half (at least 1): torch's CPU work there is host copies and tile
  stacking, and the rest is for the event loop, the prepare pool and image decoding.
* inter-op threads (`TORCH_INTEROP_THREADS`, default 1): we run no inter-op parallel work; a
  pool of them would only be idle threads.
* `OMP_WAIT_POLICY=PASSIVE`: an idle OpenMP thread sleeps instead of spinning. libgomp reads it
  once, when it is loaded (at `import torch`), so setting it later does nothing (measured:
  the same 1.2 CPUs per wall second of spinning as unset). Hence it is set in config.yaml
  `environment_variables` (the container's environment), and, for anyone who runs the library
  without that, by `set_process_defaults` when `embed_serving` is imported, which is before
  torch in our packages. `apply` logs whether it is in effect.
* `TOKENIZERS_PARALLELISM=false`: tokenising runs in `PREPARE_THREADS` threads already; a rayon
  pool inside each of them would oversubscribe the CPUs.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# What the library sets when the environment does not say (set_process_defaults).
PROCESS_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
WAIT_POLICIES = ("passive", "active")
MAX_THREADS = 1024
CGROUP_ROOT = Path("/sys/fs/cgroup")
_OPENMP_LIBRARIES = ("libgomp", "libiomp", "libomp")

# OMP_WAIT_POLICY as the OpenMP runtime saw it when it was loaded, if that was after this
# module was imported (None: loaded before, or not yet).
_wait_policy_at_load: str | None = None
_openmp_loaded_before_us = False


def openmp_loaded() -> bool:
    """Whether an OpenMP runtime is mapped into this process (it reads its environment once,
    when loaded)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: assume the worst
        return True
    return any(name in maps for name in _OPENMP_LIBRARIES)


def set_process_defaults() -> None:
    """Set PROCESS_DEFAULTS where the environment has no value. Must run before `import torch`
    to reach OpenMP: `embed_serving/__init__.py` calls it."""
    global _wait_policy_at_load, _openmp_loaded_before_us
    for name, value in PROCESS_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if _wait_policy_at_load is not None or _openmp_loaded_before_us:
        return  # what OpenMP saw is recorded on the first call
    if openmp_loaded():
        _openmp_loaded_before_us = True
    else:
        _wait_policy_at_load = os.environ["OMP_WAIT_POLICY"]


def _initial_environ(name: str) -> str | None:
    """A variable as the process started with it (/proc/self/environ)."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return None
    for entry in raw.split(b"\0"):
        key, _, value = entry.partition(b"=")
        if key.decode(errors="replace") == name:
            return value.decode(errors="replace")
    return None


def effective_wait_policy() -> str:
    """OMP_WAIT_POLICY as the loaded OpenMP runtime read it: ours if we set it before the
    runtime was loaded, else the process's initial environment ("unset" when absent)."""
    if _wait_policy_at_load is not None and not _openmp_loaded_before_us:
        return _wait_policy_at_load.lower()
    return (_initial_environ("OMP_WAIT_POLICY") or "unset").lower()


# ---- how many CPUs -------------------------------------------------------------------------


def parse_cpu_quantity(value: Any) -> float | None:
    """A Kubernetes-style CPU quantity as config.yaml's `resources.cpu` holds it: `4`, `"4"`,
    `"1.5"`, `"500m"`. None when absent or not a positive number."""
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    try:
        cpus = float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None
    return cpus if math.isfinite(cpus) and cpus > 0 else None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The container's CPU quota in CPUs (cgroup v2 `cpu.max`, or v1 `cpu.cfs_quota_us` /
    `cpu.cfs_period_us`), None when unlimited or unknown."""
    try:
        fields = (root / "cpu.max").read_text().split()  # v2: "<quota> <period>" or "max ..."
        quota, period = fields[0], fields[1]
    except (OSError, IndexError):
        try:  # v1
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None  # "max": no quota
    return q / p if q > 0 and p > 0 else None


def available_cpus(config_cpu: Any = None, cgroup_root: Path = CGROUP_ROOT) -> int:
    """The CPUs this replica may use: affinity, cgroup quota and config.yaml's resources.cpu,
    whichever is fewest (fractions rounded up: a quota of 1.5 CPUs can keep 2 threads busy
    part of the time)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    for limit in (cgroup_cpu_limit(cgroup_root), parse_cpu_quantity(config_cpu)):
        if limit is not None:
            cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


# ---- the policy ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ThreadPolicy:
    cpus: int  # what the replica may use
    intra_op: int  # torch.set_num_threads
    inter_op: int  # torch.set_num_interop_threads
    wait_policy: str  # OMP_WAIT_POLICY (what the environment asks for)
    tokenizers_parallelism: bool  # TOKENIZERS_PARALLELISM


def plan(device_type: str, cpus: int) -> ThreadPolicy:
    """The policy for a device type ("cpu", "cuda", ...) and a CPU count, with the settings in
    the environment applied. Raises SettingError naming a malformed setting."""
    from embed_serving.settings import SettingError, _env_bool, _env_int

    auto = cpus if device_type == "cpu" else max(1, cpus // 2)
    raw = os.environ.get("TORCH_THREADS", "").strip().lower()
    intra = auto if raw in ("", "auto") else _env_int("TORCH_THREADS", auto, 1, MAX_THREADS)
    inter = _env_int("TORCH_INTEROP_THREADS", 1, 1, MAX_THREADS)
    wait = os.environ.get("OMP_WAIT_POLICY", "").strip().lower() or "unset"
    if wait not in (*WAIT_POLICIES, "unset"):
        raise SettingError(
            f"setting OMP_WAIT_POLICY={wait!r} must be one of {', '.join(WAIT_POLICIES)}"
        )
    return ThreadPolicy(
        cpus=cpus,
        intra_op=intra,
        inter_op=inter,
        wait_policy=wait,
        tokenizers_parallelism=_env_bool("TOKENIZERS_PARALLELISM", False),
    )


def apply(config: dict[str, Any] | None = None) -> ThreadPolicy:
    """Work out the policy (config: the Truss config, for `resources.cpu`) and apply it to this
    process. Call it in `load()` before torch runs anything: the inter-op pool can only be sized
    before its first use."""
    import torch

    from embed_serving.checkpoint import pick_device

    set_process_defaults()  # no-op where the environment or the import already did it
    resources = (config or {}).get("resources") or {}
    policy = plan(pick_device().type, available_cpus(resources.get("cpu")))
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if policy.tokenizers_parallelism else "false"
    torch.set_num_threads(policy.intra_op)
    if torch.get_num_interop_threads() != policy.inter_op:
        try:
            torch.set_num_interop_threads(policy.inter_op)
        except RuntimeError as e:  # the pool already started: it keeps its size
            log.warning("could not set TORCH_INTEROP_THREADS=%d: %s", policy.inter_op, e)
    effective = effective_wait_policy()
    in_effect = effective == policy.wait_policy
    log.info(
        "CPU threads: %d CPUs available; torch intra-op %d, inter-op %d; OMP_WAIT_POLICY=%s%s; "
        "TOKENIZERS_PARALLELISM=%s",
        policy.cpus, torch.get_num_threads(), torch.get_num_interop_threads(),
        policy.wait_policy.upper(), "" if in_effect else f" (NOT in effect: OpenMP was "
        f"loaded with {effective.upper()}; set it in config.yaml environment_variables)",
        str(policy.tokenizers_parallelism).lower(),
    )  # fmt: skip
    return policy
