"""The device contract (embed_serving.device): DEVICE / DTYPE / ATTENTION are validated before
any weight loads, naming the setting and its choices; a config that asks for a GPU gets one or
a refusal that says why, never a silent CPU run. The end-to-end refusal (a server started from
a built context on this CPU-only machine) is in test_build_context.py."""

from __future__ import annotations

import pytest
import torch

from embed_serving import settings
from embed_serving.device import CudaProbe, DeviceError, cuda_problem, resolve_device
from embed_serving.models import attention
from embed_serving.settings import SettingError, check_env

GPU_CONFIG = {"resources": {"accelerator": "L40S", "use_gpu": True}}


@pytest.mark.parametrize(
    ("name", "value", "choices"),
    [
        ("DTYPE", "bf16", "auto, float32, bfloat16, float16"),
        ("DTYPE", "garbage", "auto, float32, bfloat16, float16"),
        ("DEVICE", "gpu", "cpu, cuda or cuda:N"),
        ("DEVICE", "cuda:x", "cpu, cuda or cuda:N"),
        ("ATTENTION", "flash", "sdpa, sdpa_masked, varlen"),
    ],
)
def test_device_settings_fail_in_check_env(monkeypatch, name: str, value: str, choices: str):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingError) as caught:
        check_env()
    assert f"{name}={value!r}" in str(caught.value) and choices in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [("DTYPE", "bfloat16"), ("DTYPE", "AUTO"), ("DEVICE", "cuda:1"), ("DEVICE", "cpu"),
     ("ATTENTION", "varlen")],
)  # fmt: skip
def test_device_settings_accept_their_choices(monkeypatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    check_env()


def test_attention_choices_are_the_model_code_paths() -> None:
    # settings keeps its own copy (it does not import torch): the two must not drift apart.
    assert settings.ATTENTION_PATHS == attention.ATTENTION_PATHS


def test_changed_lists_settings_that_differ_from_their_defaults(monkeypatch) -> None:
    monkeypatch.setenv("DTYPE", "float16")
    monkeypatch.setenv("BATCH_MAX_ITEMS", "64")  # = the default: not a change
    monkeypatch.delenv("ATTENTION", raising=False)
    check_env()
    changed = settings.changed()
    assert changed["DTYPE"] == "float16"
    assert "BATCH_MAX_ITEMS" not in changed and "ATTENTION" not in changed


def _probe(**kw: object) -> CudaProbe:
    base = dict(torch_version="2.13.0", torch_cuda="13.0", driver="580.65.06", driver_cuda="13.0",
                available=True, device_count=1, init_error=None)  # fmt: skip
    return CudaProbe(**{**base, **kw})  # type: ignore[arg-type]


def test_cuda_problem_names_the_cause() -> None:
    assert cuda_problem(_probe()) is None
    assert "CPU-only build" in cuda_problem(_probe(torch_cuda=None))  # type: ignore[operator]
    no_driver = cuda_problem(_probe(available=False, driver=None, driver_cuda=None))
    assert "no NVIDIA driver" in no_driver  # type: ignore[operator]
    old = cuda_problem(_probe(available=False, driver="570.86.15", driver_cuda="12.8"))
    # The two versions that do not fit, and what to do about it.
    assert "built for CUDA 13.0" in old and "570.86.15 supports CUDA 12.8" in old  # type: ignore[operator]
    assert "torch build for CUDA <= 12.8" in old  # type: ignore[operator]
    said = cuda_problem(_probe(available=False, init_error="CUDA unknown error"))
    assert "CUDA unknown error" in said  # type: ignore[operator]
    assert "no CUDA device 2" in cuda_problem(_probe(device_count=2), index=2)  # type: ignore[operator]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")
def test_gpu_config_without_cuda_refuses(monkeypatch) -> None:
    monkeypatch.delenv("DEVICE", raising=False)
    with pytest.raises(DeviceError, match=r"asks for a GPU \(resources.accelerator: L40S\)"):
        resolve_device(GPU_CONFIG)
    monkeypatch.setenv("DEVICE", "cuda:0")
    with pytest.raises(DeviceError, match="DEVICE=cuda:0"):
        resolve_device({})


def test_cpu_only_when_asked_or_configured(monkeypatch) -> None:
    monkeypatch.setenv("DEVICE", "cpu")
    assert resolve_device(GPU_CONFIG) == torch.device("cpu")
    monkeypatch.delenv("DEVICE")
    assert resolve_device({"resources": {"use_gpu": False}}) == torch.device("cpu")
