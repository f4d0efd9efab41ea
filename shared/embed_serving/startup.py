"""What a deployment says when it starts, and what it does when it cannot: one INFO line at
the end of a successful load (what runs, on what, with which settings), and on a failed load
an exit of the whole process in a second with the reason as the last log line.

Why exit ourselves: Truss runs `load()` in a thread and only marks the model FAILED. Under its
image entry point (`/app/main.py`) the server then shuts down with exit status 0 and its own
lines after ours; under `tools/serve.py` (uvicorn started directly) its shutdown task fails and
the process stays up, never ready, until killed. A replica that cannot serve must end, so that
the platform shows the reason and does not wait on it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from torch import nn

from embed_serving import device as devices
from embed_serving import settings
from embed_serving.errors import printable
from embed_serving.models.llama import BidirectionalLlama

log = logging.getLogger(__name__)

# Truss's control server (the `truss watch` / development image) restarts an inference server
# that died, unless this file exists: it then waits for a patch instead of a restart loop.
# Truss's own health check writes it before it kills a failed server (truss_server.py,
# INFERENCE_SERVER_FAILED_FILE); a failed load does the same here.
INFERENCE_SERVER_FAILED_FILE = Path("~/inference_server_crashed.txt")


def attention_path(model: nn.Module | None) -> str:
    """`sdpa` / `sdpa_masked` / `varlen` of the Llama stack, with the implementation its
    padded batches use (sdpa, or flash_attention_2 where flash-attn imports)."""
    for module in model.modules() if model is not None else ():
        if isinstance(module, BidirectionalLlama):
            return f"{module.attention} (padded: {module._padded_implementation})"
    return "unknown"


def revision(config: dict[str, Any], checkpoint: Path) -> str:
    """The pinned revision of the repo the checkpoint came from, or where it came from."""
    override = os.environ.get("EMBED_CHECKPOINT_DIR", "").strip()
    if override:
        return "unpinned (EMBED_CHECKPOINT_DIR)"
    metadata = config.get("model_metadata") or {}
    for repo in config.get("model_cache") or metadata.get("model_cache") or []:
        return f"{repo.get('repo_id')}@{repo.get('revision') or 'unpinned'}"
    return "unknown"


def load_report(
    config: dict[str, Any], checkpoint: Path, model: nn.Module | None, device: Any, dtype: Any,
    explicit: set[str],
) -> str:  # fmt: skip
    """The one line a successful load logs. `explicit`: the settings the deployment set (a
    setting the load itself wrote, like DEVICE, is shown only if it was given)."""
    changed = {k: v for k, v in settings.changed().items() if k in explicit or k != "DEVICE"}
    shown = ", ".join(f"{k}={v}" for k, v in changed.items()) or "none"
    return (
        f"loaded {config.get('model_name', '?')}: checkpoint {checkpoint} "
        f"({revision(config, checkpoint)}); device {devices.describe(device)}, "
        f"dtype {str(dtype).removeprefix('torch.')}, attention {attention_path(model)}; "
        f"{devices.versions()}; settings differing from defaults: {shown}"
    )


def fail(error: BaseException) -> NoReturn:
    """End the process after a failed load: the traceback, then the reason as the last line.
    `os._exit`, not `sys.exit`: this runs in Truss's load thread, where `sys.exit` would end
    only the thread, and the server's other threads would keep the process up."""
    log.error("model load failed", exc_info=error)
    # (A read-only home: a restart loop is a nuisance, not a reason to hang here.)
    with contextlib.suppress(OSError):
        INFERENCE_SERVER_FAILED_FILE.expanduser().touch()
    reason = printable(" ".join(f"{type(error).__name__}: {error}".split()))
    log.critical("model load failed, exiting: %s", reason)
    for handler in logging.getLogger().handlers + log.handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
