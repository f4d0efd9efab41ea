"""The deployment's device contract: a package whose config asks for a GPU runs on one or
refuses to start, saying why (torch's CUDA build against the driver, or no device visible). It
never falls back to the CPU silently: on the CPU these models are 50-100x slower, and a replica
that "works" that slowly is worse than one that fails. Only an explicit `DEVICE=cpu` runs on
the CPU (local runs set it).

The driver is asked directly, through its own libraries (`libcuda.so.1`: the newest CUDA it
supports; `libnvidia-ml.so.1`: its version), because `torch.cuda.is_available()` only says
no, not why.
"""

from __future__ import annotations

import ctypes
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from embed_serving.settings import device_setting


class DeviceError(RuntimeError):
    """The device the deployment asks for cannot be used; the message says why."""


def gpu_requested(config: dict[str, Any]) -> str | None:
    """What in a Truss config asks for a GPU (as `resources.accelerator: L40S`), or None."""
    resources = config.get("resources") or {}
    if resources.get("accelerator"):
        return f"resources.accelerator: {resources['accelerator']}"
    if resources.get("use_gpu"):
        return "resources.use_gpu: true"
    return None


@dataclass(frozen=True)
class CudaProbe:
    torch_version: str
    torch_cuda: str | None  # the CUDA the torch wheel was built for (torch.version.cuda)
    driver: str | None  # the NVIDIA driver's version, e.g. 570.86.15
    driver_cuda: str | None  # the newest CUDA that driver supports, e.g. 12.8
    available: bool  # torch.cuda.is_available()
    device_count: int
    init_error: str | None  # what torch warned while it tried to initialise CUDA


def _driver_cuda_version() -> str | None:
    """cuDriverGetVersion: needs no cuInit and no device, only the driver's library."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int(0)
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def driver_version() -> str | None:
    """The NVIDIA driver's version (NVML, else /proc/driver/nvidia/version), or None."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() == 0:
            try:
                buf = ctypes.create_string_buffer(96)
                if nvml.nvmlSystemGetDriverVersion(buf, ctypes.c_uint(96)) == 0:
                    return buf.value.decode()
            finally:
                nvml.nvmlShutdown()
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            found = re.search(r"Kernel Module\s+(\d+(?:\.\d+)+)", f.read())
        return found.group(1) if found else None
    except OSError:
        return None


def probe() -> CudaProbe:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    said = " ".join(" ".join(str(w.message).split()) for w in caught)
    init_error = said if said and not available else None
    return CudaProbe(
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        driver=driver_version(),
        driver_cuda=_driver_cuda_version(),
        available=available,
        device_count=torch.cuda.device_count() if available else 0,
        init_error=init_error,
    )


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


def cuda_problem(p: CudaProbe, index: int = 0) -> str | None:
    """Why CUDA device `index` cannot be used, in words, or None when it can."""
    build = f"torch {p.torch_version}"
    if p.torch_cuda is None:
        return f"{build} is a CPU-only build (no CUDA in it)"
    build += f" is built for CUDA {p.torch_cuda}"
    if not p.available:
        if p.driver_cuda is None:
            return f"no NVIDIA driver is visible (libcuda.so.1 not found), {build}"
        version = p.driver or "(version unknown)"
        driver = f"the NVIDIA driver {version} supports CUDA {p.driver_cuda}"
        if _major_minor(p.driver_cuda) < _major_minor(p.torch_cuda):
            return (
                f"{build}, but {driver}: install a torch build for CUDA <= {p.driver_cuda}, "
                "or run on a node with a newer driver"
            )
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and not visible.strip():
            return f"no CUDA device is visible (CUDA_VISIBLE_DEVICES is empty); {build}"
        said = p.init_error or "no CUDA device found"
        return f"CUDA does not initialise: {said}; {build}, {driver}"
    if index >= p.device_count:
        return f"there is no CUDA device {index}: {p.device_count} visible"
    return None


def resolve_device(config: dict[str, Any]) -> torch.device:
    """The device this deployment runs on: `DEVICE` if set, else the GPU its config asks for,
    else the CPU. A GPU that cannot be used is a `DeviceError`, never a CPU run."""
    wanted = device_setting()
    asked = gpu_requested(config)
    if wanted == "cpu" or (not wanted and asked is None):
        return torch.device("cpu")
    target = torch.device(wanted or "cuda")
    problem = cuda_problem(probe(), target.index or 0)
    if problem:
        who = f"DEVICE={wanted}" if wanted else f"the config asks for a GPU ({asked})"
        raise DeviceError(
            f"{who}, but CUDA cannot be used: {problem}. Refusing to fall back to the CPU; "
            "set DEVICE=cpu to run on the CPU on purpose"
        )
    return target


def describe(device: torch.device) -> str:
    """The device, as the load log line gives it: name and memory."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / (1 << 30):.1f} GiB)"
    return f"cpu ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"


def versions() -> str:
    """torch, the CUDA it was built for, and the driver, as the load log line gives them."""
    return (
        f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
        f"driver {driver_version() or 'none'}"
    )
