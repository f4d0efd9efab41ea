"""Checkpoint access: config, tokenizer, device/dtype choice and strict weight loading.

NVIDIA's checkpoints ship remote-code `config.json`s (`auto_map`, unknown `model_type`) that
current transformers cannot auto-load, so everything here reads the official files directly.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError, safe_open
from torch import nn

from embed_serving.settings import device_setting, dtype_setting

CHECKPOINT_ENV = "EMBED_CHECKPOINT_DIR"
# Where Truss's `model_cache` puts a repo: /app/model_cache/<volume_folder>
# (truss.base.constants.MODEL_CACHE_PATH). Overridable so that a build-context test can put a
# checkpoint where the image would have it without writing to /app.
MODEL_CACHE_ENV = "EMBED_MODEL_CACHE_DIR"
MODEL_CACHE = Path("/app/model_cache")


def model_cache_root() -> Path:
    return Path(os.environ.get(MODEL_CACHE_ENV, "").strip() or MODEL_CACHE)


def model_cache_repos(truss_config: dict[str, Any]) -> list[dict[str, Any]]:
    """The config's `model_cache` repos; `tools/serve.py` moves them under `model_metadata`
    (building a real `model_cache` would contact the Hugging Face hub)."""
    metadata = truss_config.get("model_metadata") or {}
    return list(truss_config.get("model_cache") or metadata.get("model_cache") or [])


class CheckpointError(RuntimeError):
    """The checkpoint does not match the architecture built from its own config."""


def read_config(checkpoint_dir: Path) -> dict[str, Any]:
    with open(checkpoint_dir / "config.json", encoding="utf-8") as f:
        return json.load(f)


def resolve_checkpoint_dir(truss_config: dict[str, Any], secrets: Any = None) -> Path:
    """The checkpoint a deployment serves.

    1. `EMBED_CHECKPOINT_DIR` (local development, tests, custom mounts);
    2. the pinned repo Truss's `model_cache` put under /app/model_cache/<volume_folder>
       (`EMBED_MODEL_CACHE_DIR` replaces /app/model_cache);
    3. otherwise (a local run without a checkpoint) the pinned revision from the Hugging Face
       hub, with the `hf_access_token` secret if one is set.
    """
    override = os.environ.get(CHECKPOINT_ENV, "").strip()
    if override:
        path = Path(override)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{CHECKPOINT_ENV}={override} holds no config.json")
        return path
    repos = model_cache_repos(truss_config)
    for repo in repos:
        folder = model_cache_root() / str(repo.get("volume_folder", ""))
        if (folder / "config.json").is_file():
            return folder
    if not repos:
        raise CheckpointError(f"no model_cache in config.yaml and {CHECKPOINT_ENV} is not set")
    from huggingface_hub import snapshot_download

    token = None
    try:
        token = secrets["hf_access_token"] if secrets is not None else None
    except Exception:  # Truss raises its own SecretNotFound for a secret that is not set
        token = None  # public repos download without one; a gated repo's error says so
    repo = repos[0]
    try:
        return Path(
            snapshot_download(
                repo["repo_id"],
                revision=repo.get("revision") or None,
                token=token or None,
                allow_patterns=repo.get("allow_patterns"),
            )
        )
    except Exception as err:
        looked = model_cache_root() / str(repo.get("volume_folder", ""))
        raise CheckpointError(
            f"the weights of {repo['repo_id']}@{repo.get('revision') or 'main'} are not at "
            f"{looked} (model_cache) and the download from the Hugging Face hub failed: "
            f"{type(err).__name__}: {err}"
        ) from err


def load_tokenizer(checkpoint_dir: Path, padding_side: str = "right") -> Any:
    """Load the checkpoint's tokenizer exactly as its `tokenizer.json` defines it.

    `AutoTokenizer` would consult `config.json`, whose unknown `model_type` + `auto_map` make
    transformers 5 try remote code. And the class `tokenizer_config.json` names is not always
    faithful in transformers 5: `LlamaTokenizer` (NV-Embed-v2) replaces the file's normalizer
    with its own Metaspace handling and drops a leading space that the official tokenizer keeps.
    So a `tokenizer.json` is loaded as-is with `PreTrainedTokenizerFast`; only checkpoints
    without one fall back to the named class.
    """
    if (checkpoint_dir / "tokenizer.json").is_file():
        cls: Any = transformers.PreTrainedTokenizerFast
    else:
        name = "PreTrainedTokenizerFast"
        cfg_path = checkpoint_dir / "tokenizer_config.json"
        if cfg_path.is_file():
            with open(cfg_path, encoding="utf-8") as f:
                name = json.load(f).get("tokenizer_class") or name
        cls = getattr(transformers, name, None) or transformers.PreTrainedTokenizerFast
    tokenizer = cls.from_pretrained(str(checkpoint_dir))
    # The official encoders all pad on the right (NV-Embed's tokenizer defaults to left).
    tokenizer.padding_side = padding_side
    return tokenizer


def pick_device() -> torch.device:
    """The `DEVICE` setting; unset, CUDA where it works (library use: tests, benchmarks). A
    deployment decides before any backend exists (`device.resolve_device`: the GPU its config
    asks for, or a refusal to start) and sets `DEVICE` to what it chose."""
    wanted = device_setting()
    if wanted:
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, gpu_default: torch.dtype = torch.bfloat16) -> torch.dtype:
    """fp32 on CPU (no fast half kernels there), the model card's half type on GPU."""
    wanted = dtype_setting()
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if wanted in table:
        return table[wanted]
    return gpu_default if device.type == "cuda" else torch.float32


def pick_attn_implementation(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def _safetensors_files(checkpoint_dir: Path) -> list[Path]:
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [checkpoint_dir / s for s in shards]
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors in {checkpoint_dir}")
    return files


@contextlib.contextmanager
def _open_weights(path: Path) -> Iterator[Any]:
    """safe_open, with the file named in its errors (safetensors' own say only "incomplete
    metadata" or "No such file", not which of the shards)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def tensor_names(checkpoint_dir: Path) -> list[str]:
    """Tensor names of a checkpoint, read from the index or the safetensors headers only."""
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            return sorted(json.load(f)["weight_map"])
    names: list[str] = []
    for path in _safetensors_files(checkpoint_dir):
        with _open_weights(path) as f:
            names.extend(f.keys())
    return sorted(names)


def iter_tensors(checkpoint_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in _safetensors_files(checkpoint_dir):
        with _open_weights(path) as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield key, f.get_tensor(key)


def _names(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_strict(
    module: nn.Module,
    checkpoint_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    ignore: tuple[str, ...] = (),
) -> None:
    """Load every tensor of the checkpoint into `module`, refusing any mismatch.

    A missing, unexpected or mis-shaped tensor is an error that names it: a deployment with the
    wrong weights must fail at load, never serve a silently random-initialised layer. `ignore`
    lists checkpoint key prefixes that are legitimately unused (e.g. an LM head we never run).
    The module may live on the meta device; tensors are assigned, not copied.
    """
    expected = module.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mis_shaped: list[str] = []
    for key, tensor in iter_tensors(checkpoint_dir):
        if key.startswith(ignore) and ignore:
            continue
        if key not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[key].shape):
            mis_shaped.append(
                f"{key} {tuple(tensor.shape)} != {tuple(expected[key].shape)} from config"
            )
            continue
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        loaded[key] = tensor.to(device)
    missing = sorted(set(expected) - set(loaded) - {k.split(" ")[0] for k in mis_shaped})
    problems = []
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_names(sorted(unexpected))}")
    if mis_shaped:
        problems.append(f"shape mismatches: {_names(mis_shaped)}")
    if problems:
        raise CheckpointError(f"checkpoint {checkpoint_dir} does not fit: " + "; ".join(problems))
    module.load_state_dict(loaded, strict=True, assign=True)
