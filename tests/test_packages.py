"""Every package is deployable: `truss.load` + `validate_forbid_extra` (what `truss push`
checks), pinned requirements matching the versions the tests ran, a pinned HF revision, the
secret, a GPU, and every setting the code reads documented with a default."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import truss
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["embedqa-1b-v2", "nv-embed-v2", "colembed-3b"]
# torch's CUDA 12.8 build: Truss's GPU base image is CUDA 12.8 (README, "Deploy").
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu128"
LOCK = dict(
    line.split("==", 1)
    for line in (ROOT / "requirements-dev.lock").read_text().splitlines()
    if "==" in line
)


@pytest.mark.parametrize("package", PACKAGES)
def test_truss_loads_and_validates(package: str) -> None:
    handle = truss.load(str(ROOT / package))
    handle.spec.config.validate_forbid_extra()
    assert handle.spec.config.model_name == package


@pytest.mark.parametrize("package", PACKAGES)
def test_config_pins_and_declares(package: str) -> None:
    config = yaml.safe_load((ROOT / package / "config.yaml").read_text())
    for requirement in config["requirements"]:
        if requirement.startswith("-"):
            # The only option: the index of torch's CUDA build (see the torch line below).
            assert requirement == f"--extra-index-url {TORCH_CUDA_INDEX}", requirement
            continue
        name, _, version = requirement.partition("==")
        assert version, f"{requirement} is not pinned"
        # The image runs what the tests ran (torch: the same release, in its CUDA build).
        locked = {k.lower().replace("_", "-"): v for k, v in LOCK.items()}
        if name == "torch":
            assert version == f"{locked['torch']}+{TORCH_CUDA_INDEX.rsplit('/', 1)[1]}"
            continue
        assert locked.get(name.lower()) == version, f"{requirement} differs from the lock"
    (repo,) = config["model_cache"]
    assert repo["use_volume"] and repo["revision"]
    assert "hf_access_token" in config["secrets"]
    assert config["resources"]["use_gpu"] and config["resources"]["accelerator"]
    assert config["external_package_dirs"] == ["../shared"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_setting_is_documented(package: str) -> None:
    config = yaml.safe_load((ROOT / package / "config.yaml").read_text())
    readme = (ROOT / "README.md").read_text()
    for name in config["environment_variables"]:
        assert f"`{name}`" in readme, f"{name} is not in the README's settings"
    code = "\n".join(p.read_text() for p in (ROOT / "shared").rglob("*.py"))
    read_in_code = set(re.findall(r'_env_\w+\("([A-Z_]+)"', code))
    for name in read_in_code:
        assert f"`{name}`" in readme, f"setting {name} (read in code) is not documented"
