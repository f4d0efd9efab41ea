"""Deployment settings, read from environment variables (`environment_variables` in a Truss
`config.yaml`, or the shell for `make serve`). Every limit has a default; a malformed value
fails the deployment at load with a message naming the variable."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from embed_serving.images import ImageLimits

log = logging.getLogger(__name__)


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError as e:
        raise ValueError(f"setting {name}={raw!r} is not an integer") from e
    if value < minimum:
        raise ValueError(f"setting {name}={value} must be >= {minimum}")
    return value


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError as e:
        raise ValueError(f"setting {name}={raw!r} is not a number") from e
    if value <= 0:
        raise ValueError(f"setting {name}={value} must be > 0")
    return value


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"setting {name}={raw!r} is not a boolean (true/false)")


@dataclass(frozen=True)
class Settings:
    # Token limits per input kind; the setting names appear in 400 messages.
    max_tokens: dict[str, int]
    max_tokens_setting: dict[str, str]
    max_items: int = 512  # MAX_ITEMS_PER_REQUEST: queries + passages in one request
    batch_max_items: int = 64  # BATCH_MAX_ITEMS: items per forward pass
    batch_max_tokens: int = 32768  # BATCH_MAX_TOKENS: padded tokens per forward pass
    max_top_k: int = 1000
    max_queue_tokens: int = 1_048_576  # MAX_QUEUE_TOKENS: waiting tokens (429 past it)
    prepare_threads: int = 2  # PREPARE_THREADS: tokenising / tiling / encoding threads
    images: ImageLimits = field(default_factory=ImageLimits)

    @classmethod
    def from_env(
        cls,
        token_limits: dict[str, tuple[str, int]],
        model_max_tokens: int,
        batch_max_tokens: int = 32768,
    ) -> Settings:
        """`token_limits` maps an input kind to (setting name, default)."""
        max_tokens: dict[str, int] = {}
        names: dict[str, str] = {}
        for kind, (name, default) in token_limits.items():
            # A checkpoint with fewer positions than the default caps the default. An explicit
            # larger value is allowed (RoPE has no hard position limit) but flagged.
            value = _env_int(name, min(default, model_max_tokens))
            if value > model_max_tokens:
                log.warning(
                    "setting %s=%d exceeds the checkpoint's max_position_embeddings=%d; "
                    "quality beyond it is not what the model was trained for",
                    name, value, model_max_tokens,
                )  # fmt: skip
            max_tokens[kind], names[kind] = value, name
        return cls(
            max_tokens=max_tokens,
            max_tokens_setting=names,
            max_items=_env_int("MAX_ITEMS_PER_REQUEST", 512),
            batch_max_items=_env_int("BATCH_MAX_ITEMS", 64),
            batch_max_tokens=_env_int("BATCH_MAX_TOKENS", batch_max_tokens),
            max_top_k=_env_int("MAX_TOP_K", 1000),
            max_queue_tokens=_env_int("MAX_QUEUE_TOKENS", 1_048_576),
            prepare_threads=_env_int("PREPARE_THREADS", 2),
            images=ImageLimits(
                max_bytes=_env_int("IMAGE_MAX_BYTES", ImageLimits.max_bytes),
                max_pixels=_env_int("IMAGE_MAX_PIXELS", ImageLimits.max_pixels),
                fetch_timeout_s=_env_float("IMAGE_FETCH_TIMEOUT_S", ImageLimits.fetch_timeout_s),
                max_redirects=_env_int("IMAGE_MAX_REDIRECTS", ImageLimits.max_redirects, 0),
                allow_private=_env_bool("IMAGE_ALLOW_PRIVATE_URLS", False),
                max_concurrency=_env_int("IMAGE_FETCH_CONCURRENCY", ImageLimits.max_concurrency),
            ),
        )
