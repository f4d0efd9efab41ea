"""Turn a raw JSON body (either route) into a typed `EmbedRequest`, or a `RequestError` that
names the field, the item index and the limit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from embed_serving import fde
from embed_serving.errors import RequestError, show
from embed_serving.images import ImageSource
from embed_serving.settings import Settings

Kind = Literal["query", "passage"]
TRUNCATE_VALUES = ("NONE", "START", "END")
ENCODING_FORMATS = ("float", "base64")
INPUT_TYPES = ("query", "passage")
# NIM's output types: float32, or each dimension's sign packed 8 to a byte (binary = int8 bytes,
# ubinary = uint8 bytes). int8/uint8 are named by NIM too; see EMBEDDING_TYPES_SUPPORTED.
EMBEDDING_TYPES = ("float", "int8", "uint8", "binary", "ubinary")
EMBEDDING_TYPES_SUPPORTED = ("float", "binary", "ubinary")
MODALITIES = ("text", "image", "text_image")
_PLURAL = {"query": "queries", "passage": "passages"}


@dataclass(frozen=True)
class ModelCaps:
    """What a model accepts; drives validation."""

    name: str  # the name answered in `model` fields
    model_ids: tuple[str, ...]  # accepted values of `model` on /v1/embeddings
    multi_vector: bool = False
    supports_images: bool = False
    supports_instruction: bool = False
    dimensions: tuple[int, ...] = ()  # Matryoshka sizes; () = fixed size
    dimension: int = 0  # the full output width (response-size estimates)


@dataclass
class Item:
    """One input: text, an image, or an image with text (colembed passages)."""

    text: str | None = None
    image: ImageSource | None = None
    # The image's tiles (uint8 (n, 3, S, S) for colembed), filled in before tokenising; the
    # decoded bitmap itself is never kept (a 50 MP page is 150 MB, its tiles ~4 MB).
    pixel_values: Any = None


@dataclass
class EmbedRequest:
    queries: list[Item] = field(default_factory=list)
    passages: list[Item] = field(default_factory=list)
    instruction: str | None = None
    dimensions: int | None = None
    truncate: str = "END"
    encoding_format: str = "float"
    embedding_type: str = "float"
    return_embeddings: bool = True
    compute_scores: bool = False
    top_k: int | None = None
    batch_size: int | None = None
    pool_factor: int = 1  # multi-vector passages only; 1 = not pooled (see pooling.py)
    fde: fde.FdeParams | None = None  # MUVERA encodings asked for (see fde.py)
    # The request field each kind came in (`queries`, `query`, `documents`, `input`, ...), for
    # messages that must name the client's own field.
    fields: dict[str, str] = field(
        default_factory=lambda: {"query": "queries", "passage": "passages"}
    )

    def label(self, kind: Kind, index: int) -> str:
        name = self.fields[kind]
        return name if name in ("query", "input") and self.single else f"{name}[{index}]"

    single: bool = False  # `query` (one string) on predict, a string `input` on embeddings


def _check_bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise RequestError(f"`{name}` must be true or false, got {_kind(value)}")
    return value


def _check_positive_int(body: dict[str, Any], name: str, maximum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(f"`{name}` must be a positive integer, got {show(value)}")
    if maximum is not None and value > maximum:
        raise RequestError(f"`{name}` is {value}, the limit is {maximum}")
    return value


def _check_choice(body: dict[str, Any], name: str, choices: tuple[str, ...], default: str) -> str:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise RequestError(f"`{name}` must be one of {', '.join(choices)}, got {_kind(value)}")
    # NIM accepts these case-insensitively (`"end"`, `"Base64"`): normalise, then check.
    normal = value.upper() if choices is TRUNCATE_VALUES else value.lower()
    if normal not in choices:
        raise RequestError(f"`{name}` must be one of {', '.join(choices)}, got {show(value)}")
    return normal


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return names.get(type(value), type(value).__name__)


def _names(keys: list[str]) -> str:
    """Unknown keys for a message: a few, each shown short and escaped (a client's key can be
    megabytes long or hold control characters)."""
    shown = ", ".join(show(k)[1:-1] for k in keys[:5])
    return shown + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _check_text(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise RequestError(f"{where} must be a string, got {_kind(text)}")
    if not text.strip():
        raise RequestError(f"{where} is empty")
    if "\x00" in text:
        raise RequestError(f"{where} contains a NUL character")
    return text


def _parse_item(raw: Any, where: str, caps: ModelCaps, kind: Kind) -> Item:
    if isinstance(raw, str):
        if raw.startswith("data:image/") and caps.supports_images and kind == "passage":
            return Item(image=ImageSource(url=raw))
        if raw.startswith("data:image/"):
            raise RequestError(f"{where}: images are not accepted by {caps.name} {_PLURAL[kind]}")
        return Item(text=_check_text(raw, where))
    if not isinstance(raw, dict):
        raise RequestError(f"{where} must be a string or an object, got {_kind(raw)}")
    item_type = raw.get("type", "text" if "text" in raw else None)
    known = {"type", "text", "url", "content", "image_url"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise RequestError(f"{where}: unknown field(s) {_names(unknown)}")
    if item_type == "text":
        if "url" in raw or "content" in raw:
            raise RequestError(f"{where}: a text item takes only `text`")
        return Item(text=_check_text(raw.get("text"), f"{where}.text"))
    if item_type == "image":
        if not caps.supports_images or kind != "passage":
            raise RequestError(f"{where}: images are not accepted by {caps.name} {_PLURAL[kind]}")
        url, content = raw.get("url", raw.get("image_url")), raw.get("content")
        if (url is None) == (content is None):
            raise RequestError(f"{where}: an image needs exactly one of `url` or `content`")
        if url is not None and (not isinstance(url, str) or not url):
            raise RequestError(f"{where}.url must be a non-empty string")
        if content is not None and (not isinstance(content, str) or not content):
            raise RequestError(f"{where}.content must be a non-empty base64 string")
        text = raw.get("text")
        if text is not None:
            text = _check_text(text, f"{where}.text")
        return Item(text=text, image=ImageSource(url=url, content=content))
    raise RequestError(f"{where}.type must be 'text' or 'image', got {show(item_type)}")


def _parse_items(raw: Any, field_name: str, caps: ModelCaps, kind: Kind) -> list[Item]:
    if not isinstance(raw, list):
        raise RequestError(f"`{field_name}` must be a list, got {_kind(raw)}")
    if not raw:
        raise RequestError(f"`{field_name}` is empty")
    return [_parse_item(x, f"{field_name}[{i}]", caps, kind) for i, x in enumerate(raw)]


def _too_many(count: int, settings: Settings) -> RequestError:
    return RequestError(
        f"request has {count} inputs, the limit is {settings.max_items} (MAX_ITEMS_PER_REQUEST)",
        code="too_many_inputs",
    )


def _check_lengths(req: EmbedRequest, settings: Settings) -> None:
    """Characters against what the token limit allows, before any tokenising: a token covers
    at most a few characters of real text, so an input over `INPUT_CHARS_PER_TOKEN` x its token
    limit is either refused (truncate NONE) or cut to that many characters (END keeps the head,
    START the tail), which leaves the tokens kept unchanged while saving the tokeniser a pass
    over megabytes it would throw away."""
    for kind, items in (("query", req.queries), ("passage", req.passages)):
        limit = settings.max_tokens[kind]
        chars = limit * settings.chars_per_token
        for i, item in enumerate(items):
            if item.text is None or len(item.text) <= chars:
                continue
            if req.truncate == "NONE":
                raise RequestError(
                    f"{req.label(kind, i)} has {len(item.text)} characters, more than "
                    f"{settings.chars_per_token} (INPUT_CHARS_PER_TOKEN) x the limit of {limit} "
                    f"tokens ({settings.max_tokens_setting[kind]}); shorten it or send "
                    "`truncate: END` or `START`",
                )
            item.text = item.text[:chars] if req.truncate == "END" else item.text[-chars:]


def _check_common(
    body: dict[str, Any], req: EmbedRequest, caps: ModelCaps, settings: Settings
) -> None:
    count = len(req.queries) + len(req.passages)
    if count > settings.max_items:
        raise _too_many(count, settings)
    _check_lengths(req, settings)
    embedding_type = _check_choice(body, "embedding_type", EMBEDDING_TYPES, "float")
    if embedding_type not in EMBEDDING_TYPES_SUPPORTED:
        raise RequestError(
            f"`embedding_type` {embedding_type} is not served yet (NIM does not document its "
            f"int8/uint8 scaling, so we cannot match it); use one of "
            f"{', '.join(EMBEDDING_TYPES_SUPPORTED)}",
            param="embedding_type",
        )
    req.embedding_type = embedding_type
    dims = body.get("dimensions")
    if dims is not None:
        if not caps.dimensions:
            raise RequestError(f"`dimensions` is not supported by {caps.name}")
        if isinstance(dims, bool) or not isinstance(dims, int) or dims not in caps.dimensions:
            sizes = ", ".join(str(d) for d in caps.dimensions)
            raise RequestError(f"`dimensions` must be one of {sizes}, got {show(dims)}")
        req.dimensions = dims
    instruction = body.get("instruction")
    if instruction is not None:
        if not caps.supports_instruction:
            raise RequestError(f"`instruction` is not supported by {caps.name}")
        if not isinstance(instruction, str):
            raise RequestError(f"`instruction` must be a string, got {_kind(instruction)}")
        if len(instruction) > 2000:
            raise RequestError(f"`instruction` is {len(instruction)} characters, the limit is 2000")
        req.instruction = instruction
    _check_reductions(body, req, caps, settings)


def _check_reductions(
    body: dict[str, Any], req: EmbedRequest, caps: ModelCaps, settings: Settings
) -> None:
    """`pool_factor` and `fde`: multi-vector (colembed) only."""
    pool_factor = body.get("pool_factor")
    if pool_factor is not None:
        if not caps.multi_vector:
            raise RequestError(
                f"`pool_factor` is not supported by {caps.name}: it pools the token vectors of "
                "multi-vector passages (colembed-3b)",
                param="pool_factor",
            )
        if isinstance(pool_factor, bool) or not isinstance(pool_factor, int) or pool_factor < 1:
            raise RequestError(
                f"`pool_factor` must be a positive integer (1 = no pooling), got "
                f"{show(pool_factor)}",
                param="pool_factor",
            )
        if pool_factor > settings.max_pool_factor:
            raise RequestError(
                f"`pool_factor` is {pool_factor}, the limit is {settings.max_pool_factor} "
                "(MAX_POOL_FACTOR)",
                param="pool_factor",
            )
        req.pool_factor = pool_factor
    elif caps.multi_vector:
        req.pool_factor = settings.pool_factor
    raw = body.get("fde")
    if raw is None or raw is False:
        return
    if not caps.multi_vector:
        raise RequestError(
            f"`fde` is not supported by {caps.name}: MUVERA encodes multi-vectors (colembed-3b)",
            param="fde",
        )
    if raw is True:
        params = fde.FdeParams()
    elif isinstance(raw, dict):
        unknown = sorted(set(raw) - {"k_sim", "dim_proj", "r_reps", "seed"})
        if unknown:
            raise RequestError(f"`fde`: unknown field(s) {_names(unknown)}", param="fde")
        values = {}
        limits = {
            "k_sim": (1, fde.MAX_K_SIM),
            "dim_proj": (1, min(fde.MAX_DIM_PROJ, caps.dimension)),
            "r_reps": (1, fde.MAX_R_REPS),
            "seed": (0, 2**63 - 1),
        }
        for name, (low, high) in limits.items():
            if name not in raw:
                continue
            value = raw[name]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise RequestError(
                    f"`fde.{name}` must be an integer from {low} to {high}, got {show(value)}",
                    param="fde",
                )
            values[name] = value
        params = fde.FdeParams(**values)
    else:
        raise RequestError(
            f"`fde` must be true or an object {{k_sim, dim_proj, r_reps, seed}}, got {_kind(raw)}",
            param="fde",
        )
    if params.dimensions() > settings.max_fde_dimensions:
        raise RequestError(
            f"`fde` would have r_reps x 2^k_sim x dim_proj = {params.dimensions()} dimensions, "
            f"the limit is {settings.max_fde_dimensions} (MAX_FDE_DIMENSIONS)",
            param="fde",
        )
    req.fde = params


def parse_predict(body: Any, caps: ModelCaps, settings: Settings) -> EmbedRequest:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_kind(body)}")
    known = {
        "queries", "passages", "query", "documents", "batch_size", "compute_scores",
        "instruction", "dimensions", "truncate", "encoding_format", "return_embeddings",
        "top_k", "model", "embedding_type", "pool_factor", "fde",
    }  # fmt: skip
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(f"unknown field(s): {_names(unknown)}")
    if "query" in body and "queries" in body:
        raise RequestError("give either `query` or `queries`, not both")
    if "documents" in body and "passages" in body:
        raise RequestError("give either `documents` or `passages`, not both")
    req = EmbedRequest()
    req.fields = {
        "query": "query" if "query" in body else "queries",
        "passage": "documents" if "documents" in body else "passages",
    }
    req.single = "query" in body
    if "query" in body:  # Triton NV-Embed alias: one query
        req.queries = [_parse_item(body["query"], "query", caps, "query")]
    elif body.get("queries") is not None:
        req.queries = _parse_items(body["queries"], "queries", caps, "query")
    passages_field = "documents" if "documents" in body else "passages"
    if body.get(passages_field) is not None:
        req.passages = _parse_items(body[passages_field], passages_field, caps, "passage")
    if not req.queries and not req.passages:
        raise RequestError("give `queries` and/or `passages` (at least one input)")
    req.truncate = _check_choice(body, "truncate", TRUNCATE_VALUES, "END")
    req.encoding_format = _check_choice(body, "encoding_format", ENCODING_FORMATS, "float")
    req.return_embeddings = _check_bool(body, "return_embeddings", True)
    req.compute_scores = _check_bool(body, "compute_scores", False)
    req.batch_size = _check_positive_int(body, "batch_size", settings.batch_max_items)
    req.top_k = _check_positive_int(body, "top_k", settings.max_top_k)
    if req.top_k is not None and not req.compute_scores:
        raise RequestError("`top_k` needs `compute_scores: true`")
    if req.compute_scores and not (req.queries and req.passages):
        raise RequestError("`compute_scores` needs both queries and passages")
    _check_common(body, req, caps, settings)
    if not req.return_embeddings and not req.compute_scores and req.fde is None:
        raise RequestError(
            "nothing to return: `return_embeddings` is false and neither scores nor `fde` asked"
        )
    return req


def _input_type(body: dict[str, Any], caps: ModelCaps) -> tuple[str | None, str | None]:
    """(input type the request states, `model` without a NIM suffix): `input_type`, or NIM's
    `-query` / `-passage` suffix on `model`, which is how OpenAI-only clients (that cannot send
    `input_type`) say it. Both given and different is a contradiction, not a precedence."""
    model = body.get("model")
    suffix = None
    if model is not None:
        if not isinstance(model, str):
            raise RequestError(f"`model` must be a string, got {_kind(model)}")
        if model not in caps.model_ids:
            for kind in INPUT_TYPES:
                if model.endswith(f"-{kind}") and model[: -len(kind) - 1] in caps.model_ids:
                    model, suffix = model[: -len(kind) - 1], kind
                    break
            else:
                raise RequestError(
                    f"`model` must be one of {', '.join(caps.model_ids)} (optionally with "
                    f"-query or -passage), got {show(body.get('model'))}"
                )
    stated = body.get("input_type")
    if stated is not None:
        if not isinstance(stated, str) or stated.lower() not in INPUT_TYPES:
            raise RequestError(f"`input_type` must be one of query, passage, got {show(stated)}")
        stated = stated.lower()
        if suffix is not None and suffix != stated:
            raise RequestError(
                f"`input_type` is {stated!r} but `model` ends in -{suffix}; say it one way, or "
                "the same way twice",
                param="input_type",
            )
    return stated or suffix, model


def _modalities(body: dict[str, Any], count: int, caps: ModelCaps) -> list[str | None]:
    """NIM's `modality`: one value for all inputs or one per input; None = inferred."""
    raw = body.get("modality")
    if raw is None:
        return [None] * count
    if not caps.supports_images:
        if raw == "text" or (isinstance(raw, list) and all(m == "text" for m in raw)):
            return [None] * count  # what a text model does anyway: accept it
        raise RequestError(f"`modality` must be text for {caps.name}, got {show(raw)}")
    values = [raw] * count if isinstance(raw, str) else raw
    if not isinstance(values, list) or len(values) != count:
        raise RequestError(
            f"`modality` must be one of {', '.join(MODALITIES)} or a list of one per input "
            f"({count}), got {show(raw)}"
        )
    for i, value in enumerate(values):
        if value not in MODALITIES:
            raise RequestError(f"modality[{i}] must be one of {', '.join(MODALITIES)}, "
                               f"got {show(value)}")  # fmt: skip
    return values


def _modal_item(raw: Any, modality: str | None, where: str, caps: ModelCaps, kind: Kind) -> Item:
    if modality is None or not isinstance(raw, str):
        return _parse_item(raw, where, caps, kind)
    is_image = raw[:11].lower() == "data:image/"
    if modality == "text":
        return Item(text=_check_text(raw, where))
    if not is_image:
        raise RequestError(f"{where}: modality {modality} needs a data:image/...;base64, URL")
    if kind != "passage":
        raise RequestError(f"{where}: images are not accepted by {caps.name} queries")
    if modality == "image":
        return Item(image=ImageSource(url=raw))
    # text_image: the data URL, then whitespace, then the text (base64 has no whitespace).
    url, _, text = raw.partition(" ")
    return Item(image=ImageSource(url=url), text=_check_text(text, f"{where} (text part)"))


def parse_embeddings(body: Any, caps: ModelCaps, settings: Settings) -> EmbedRequest:
    """The OpenAI / NIM `/v1/embeddings` body."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_kind(body)}")
    known = {
        "input", "model", "input_type", "encoding_format", "truncate", "dimensions", "user",
        "instruction", "embedding_type", "modality", "pool_factor", "fde", "return_embeddings",
    }  # fmt: skip
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(f"unknown field(s): {_names(unknown)}")
    stated, _ = _input_type(body, caps)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError(f"`user` must be a string, got {_kind(user)}")
    if "input" not in body:
        raise RequestError("`input` is required (a string or a list of strings)")
    raw = body["input"]
    if isinstance(raw, str):
        raws, labels = [raw], ["input"]
    elif isinstance(raw, list):
        if not raw:
            raise RequestError("`input` is empty")
        if all(isinstance(x, int) and not isinstance(x, bool) for x in raw) or any(
            isinstance(x, list) for x in raw
        ):
            raise RequestError("`input` must be text: token-id arrays are not accepted")
        raws, labels = raw, [f"input[{i}]" for i in range(len(raw))]
    else:
        raise RequestError(f"`input` must be a string or a list of strings, got {_kind(raw)}")
    if len(raws) > settings.max_items:
        raise _too_many(len(raws), settings)  # before looking at a single item
    modalities = _modalities(body, len(raws), caps)
    kind: Kind
    if stated is not None:
        kind = "query" if stated == "query" else "passage"
    elif caps.supports_images and any(
        m in ("image", "text_image") or (m is None and isinstance(x, str)
                                         and x[:11].lower() == "data:image/")
        for x, m in zip(raws, modalities, strict=True)
    ):  # fmt: skip
        kind = "passage"  # as NIM: images are passages when the request does not say
    elif settings.default_input_type == "required":
        raise RequestError(
            f'`input_type` is required by this deployment: send "input_type": "query" or '
            f'"passage", or end `model` in -query or -passage (e.g. {caps.name}-passage) '
            "for clients that cannot send input_type",
            param="input_type",
        )
    else:
        kind = "query" if settings.default_input_type == "query" else "passage"
    items = [
        _modal_item(x, m, label, caps, kind)
        for x, m, label in zip(raws, modalities, labels, strict=True)
    ]
    for label, item in zip(labels, items, strict=True):
        if item.image is not None and item.image.url and not item.image.url.startswith("data:"):
            raise RequestError(f"{label}: images on /v1/embeddings are data: URLs")
    req = EmbedRequest(truncate="NONE", fields={"query": "input", "passage": "input"})
    req.single = isinstance(raw, str)
    if kind == "query":
        req.queries = items
    else:
        req.passages = items
    req.encoding_format = _check_choice(body, "encoding_format", ENCODING_FORMATS, "float")
    req.truncate = _check_choice(body, "truncate", TRUNCATE_VALUES, "NONE")
    req.return_embeddings = _check_bool(body, "return_embeddings", True)
    _check_common(body, req, caps, settings)
    if not req.return_embeddings and req.fde is None:
        raise RequestError("nothing to return: `return_embeddings` is false and no `fde` asked")
    return req
