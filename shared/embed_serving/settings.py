"""Deployment settings, read from environment variables (`environment_variables` in a Truss
`config.yaml`, or the shell for `make serve`). Every limit has a default; a malformed value
fails the deployment at load with a message naming the variable."""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from embed_serving.images import ImageLimits

log = logging.getLogger(__name__)

# Every setting read so far: name -> (value, the code's default). The load log line lists those
# that differ from their default (`changed()`), so a deployment says what it runs with.
_SEEN: dict[str, tuple[Any, Any]] = {}
_Reader = TypeVar("_Reader", bound=Callable[..., Any])

# Upper bounds keep every cap meaningful: a cap of 2^50 bytes is no cap at all.
GIB = 1 << 30


def _recorded(reader: _Reader) -> _Reader:
    @functools.wraps(reader)
    def read(name: str, default: Any, *args: Any, **kwargs: Any) -> Any:
        value = reader(name, default, *args, **kwargs)
        _SEEN[name] = (value, default)
        return value

    return read  # type: ignore[return-value]


def changed() -> dict[str, Any]:
    """The settings read so far whose value differs from the code's default."""
    return {name: value for name, (value, default) in sorted(_SEEN.items()) if value != default}


@_recorded
def _env_int(name: str, default: int, minimum: int = 1, maximum: int = 1 << 24) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise SettingError(f"setting {name}={raw!r} is not an integer") from None
    if not minimum <= value <= maximum:
        raise SettingError(f"setting {name}={value} must be between {minimum} and {maximum}")
    return value


@_recorded
def _env_float(name: str, default: float, minimum: float = 0.0, maximum: float = 86400.0) -> float:
    """A finite number in (minimum, maximum]: `nan` or `inf` would pass a plain `> 0` check
    and then break every use (a timeout of nan never fires, one of inf never ends)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingError(f"setting {name}={raw!r} is not a number") from None
    if not math.isfinite(value) or not minimum < value <= maximum:
        raise SettingError(f"setting {name}={raw} must be a number > {minimum} and <= {maximum}")
    return value


@_recorded
def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise SettingError(f"setting {name}={raw!r} is not a boolean (true/false)")


@_recorded
def _env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in choices:
        raise SettingError(f"setting {name}={raw!r} must be one of {', '.join(choices)}")
    return raw


class SettingError(ValueError):
    """A malformed deployment setting: the message names it and what it must be."""


# What `/v1/embeddings` does with a request that says neither `input_type` nor a model suffix.
DEFAULT_INPUT_TYPES = ("query", "passage", "required")


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
    # ENGINE_MAX_CONSECUTIVE_FAILURES: failed forward passes in a row that stop the engine.
    max_consecutive_failures: int = 5
    prepare_threads: int = 2  # PREPARE_THREADS: tokenising / tiling / encoding threads
    # MAX_REQUEST_BYTES: the body, after decompression, checked before it is all read.
    max_request_bytes: int = 64 << 20
    # MAX_INFLIGHT_BYTES: request bodies held at once across all requests (429 past it).
    max_inflight_bytes: int = 256 << 20
    # MAX_RESPONSE_BYTES: the response a request would produce, estimated before model work.
    max_response_bytes: int = 256 << 20
    # INPUT_CHARS_PER_TOKEN: characters an input may have per token of its limit; checked
    # before tokenising, so a 20 MB string costs a length check, not 30 s of tokeniser time.
    chars_per_token: int = 16
    # REQUEST_BODY_TIMEOUT_S: the longest wait for the next piece of a request body (408).
    body_timeout_s: float = 30.0
    # CONNECTION_IDLE_TIMEOUT_S: a connection that sends no complete request head in this time
    # (from its opening or its previous response) is closed.
    idle_timeout_s: float = 20.0
    default_input_type: str = "query"  # DEFAULT_INPUT_TYPE: query / passage / required
    # colembed passages: POOL_FACTOR when a request sends no `pool_factor` (1 = no pooling),
    # MAX_POOL_FACTOR the largest one accepted, MAX_FDE_DIMENSIONS the largest MUVERA encoding.
    pool_factor: int = 1
    max_pool_factor: int = 16
    max_fde_dimensions: int = 65536
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
            value = _env_int(name, min(default, model_max_tokens), maximum=1 << 24)
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
            max_items=_env_int("MAX_ITEMS_PER_REQUEST", 512, maximum=1 << 20),
            batch_max_items=_env_int("BATCH_MAX_ITEMS", 64, maximum=1 << 16),
            batch_max_tokens=_env_int("BATCH_MAX_TOKENS", batch_max_tokens, maximum=1 << 24),
            max_top_k=_env_int("MAX_TOP_K", 1000, maximum=1 << 20),
            max_queue_tokens=_env_int("MAX_QUEUE_TOKENS", 1_048_576, maximum=1 << 30),
            max_consecutive_failures=_env_int("ENGINE_MAX_CONSECUTIVE_FAILURES", 5, maximum=1000),
            prepare_threads=_env_int("PREPARE_THREADS", 2, maximum=256),
            max_request_bytes=(
                max_request := _env_int("MAX_REQUEST_BYTES", 64 << 20, 1024, maximum=4 * GIB)
            ),
            max_inflight_bytes=_env_int(
                "MAX_INFLIGHT_BYTES", 4 * max_request, max_request, maximum=64 * GIB
            ),
            max_response_bytes=_env_int(
                "MAX_RESPONSE_BYTES", 256 << 20, minimum=1024, maximum=16 * GIB
            ),
            chars_per_token=_env_int("INPUT_CHARS_PER_TOKEN", 16, maximum=1024),
            body_timeout_s=_env_float("REQUEST_BODY_TIMEOUT_S", 30.0, maximum=3600),
            idle_timeout_s=_env_float("CONNECTION_IDLE_TIMEOUT_S", 20.0, maximum=3600),
            default_input_type=_env_choice("DEFAULT_INPUT_TYPE", "query", DEFAULT_INPUT_TYPES),
            max_pool_factor=(max_pool := _env_int("MAX_POOL_FACTOR", 16, maximum=1024)),
            pool_factor=_env_int("POOL_FACTOR", 1, maximum=max_pool),
            max_fde_dimensions=_env_int("MAX_FDE_DIMENSIONS", 65536, maximum=1 << 20),
            images=ImageLimits(
                max_bytes=(
                    max_image := _env_int("IMAGE_MAX_BYTES", ImageLimits.max_bytes, maximum=GIB)
                ),
                max_pixels=(
                    max_pixels := _env_int("IMAGE_MAX_PIXELS", ImageLimits.max_pixels, maximum=GIB)
                ),
                fetch_timeout_s=_env_float(
                    "IMAGE_FETCH_TIMEOUT_S", ImageLimits.fetch_timeout_s, maximum=3600
                ),
                max_redirects=_env_int(
                    "IMAGE_MAX_REDIRECTS", ImageLimits.max_redirects, 0, maximum=100
                ),
                allow_private=_env_bool("IMAGE_ALLOW_PRIVATE_URLS", False),
                max_concurrency=_env_int(
                    "IMAGE_FETCH_CONCURRENCY", ImageLimits.max_concurrency, maximum=256
                ),
                fetch_deadline_s=_env_float(
                    "IMAGE_FETCH_DEADLINE_S", ImageLimits.fetch_deadline_s, maximum=3600
                ),
                # Default: room for two images of IMAGE_MAX_PIXELS decoding at once.
                decode_budget_pixels=_env_int(
                    "IMAGE_DECODE_BUDGET_PIXELS",
                    max(ImageLimits.decode_budget_pixels, 2 * max_pixels),
                    minimum=max_pixels,  # else an image within IMAGE_MAX_PIXELS never decodes
                    maximum=64 * GIB,
                ),
                # At least one image's download; its tiles are added at load, from config.json.
                memory_budget_bytes=_env_int(
                    "IMAGE_MEMORY_BUDGET_BYTES",
                    ImageLimits.memory_budget_bytes,
                    max(1 << 20, max_image),
                    maximum=1024 * GIB,
                ),
            ),
        )


# Token-limit settings of the three packages (each reads the ones for its input kinds).
TOKEN_LIMIT_SETTINGS = ("MAX_INPUT_TOKENS", "MAX_QUERY_TOKENS", "MAX_PASSAGE_TOKENS")


# Device settings (read by checkpoint.pick_device / pick_dtype and models/attention.py).
DTYPES = ("auto", "float32", "bfloat16", "float16")
# = models.attention.ATTENTION_PATHS (a test keeps them equal); not imported, so that settings
# stays free of torch.
ATTENTION_PATHS = ("sdpa", "sdpa_masked", "varlen")
_DEVICE_RE = re.compile(r"(cpu|cuda(:\d+)?)")


@_recorded
def _env_device(name: str, default: str) -> str:
    """`cpu`, `cuda` or `cuda:N`; empty = `default` (the deployment's config decides)."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if not _DEVICE_RE.fullmatch(raw):
        raise SettingError(f"setting {name}={raw!r} must be cpu, cuda or cuda:N (e.g. cuda:0)")
    return raw


def device_setting() -> str:
    """DEVICE: '' when unset (then the config's `resources` decide: GPU or refuse to start)."""
    return _env_device("DEVICE", "")


def dtype_setting() -> str:
    """DTYPE: `auto` (the model card's half type on GPU, fp32 on CPU) or an explicit type."""
    return _env_choice("DTYPE", "auto", DTYPES)


def attention_setting() -> str:
    """ATTENTION: the attention path of the Llama stacks (see models/attention.py)."""
    return _env_choice("ATTENTION", "sdpa", ATTENTION_PATHS)


def check_env() -> Settings:
    """Validate every setting in the environment, before any weight is read: a typo must fail
    the deployment in a second, not after a full load (which Truss then retries). Returns the
    settings that do not depend on the checkpoint (token limits there are placeholders)."""
    device_setting()
    dtype_setting()
    attention_setting()
    settings = Settings.from_env(
        {name: (name, 1) for name in TOKEN_LIMIT_SETTINGS}, model_max_tokens=1 << 30
    )
    # Checked with a stand-in default; the package records them with its own when it reads them.
    for name in TOKEN_LIMIT_SETTINGS:
        _SEEN.pop(name, None)
    return settings
