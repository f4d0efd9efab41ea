"""Prometheus metrics, on the registry that Truss's server already serves at `/metrics`.

Defined once per process (a second registration of a name is an error), updated by the engine
and the routes. Names and meanings are listed in the README.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

QUEUE_INPUTS = Gauge("embed_queue_inputs", "Inputs waiting in the engine queue")
QUEUE_TOKENS = Gauge("embed_queue_tokens", "Tokens waiting in the engine queue")
BATCH_SIZE = Histogram(
    "embed_batch_size",
    "Inputs per forward pass",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_PADDING = Histogram(
    "embed_batch_padding_ratio",
    "Share of padded positions in a forward pass (0 = no waste)",
    buckets=(0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5),
)
FORWARD_SECONDS = Histogram(
    "embed_forward_seconds",
    "Time of one forward pass, outputs on the host",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TOKENS = Counter("embed_tokens", "Real (unpadded) tokens embedded; rate() gives tokens/s")
INPUTS = Counter("embed_inputs", "Inputs embedded")
DROPPED = Counter("embed_inputs_dropped", "Queued inputs dropped because the client hung up")
OOM_SPLITS = Counter("embed_oom_splits", "Forward passes split in halves after out-of-memory")
REJECTED = Counter("embed_queue_rejections", "Requests refused with 429 because the queue was full")
REQUESTS = Counter(
    "embed_requests", "Requests answered, by route and HTTP status", ["route", "status"]
)
