"""Turn a raw JSON body (either route) into a typed `EmbedRequest`, or a `RequestError` that
names the field, the item index and the limit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from embed_serving.errors import RequestError
from embed_serving.images import ImageSource
from embed_serving.settings import Settings

Kind = Literal["query", "passage"]
TRUNCATE_VALUES = ("NONE", "START", "END")
ENCODING_FORMATS = ("float", "base64")
INPUT_TYPES = ("query", "passage")
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


@dataclass
class Item:
    """One input: text, an image, or an image with text (colembed passages)."""

    text: str | None = None
    image: ImageSource | None = None
    image_data: Any = None  # the decoded PIL image, filled in before tokenising


@dataclass
class EmbedRequest:
    queries: list[Item] = field(default_factory=list)
    passages: list[Item] = field(default_factory=list)
    instruction: str | None = None
    dimensions: int | None = None
    truncate: str = "END"
    encoding_format: str = "float"
    return_embeddings: bool = True
    compute_scores: bool = False
    top_k: int | None = None
    batch_size: int | None = None


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
        raise RequestError(f"`{name}` must be a positive integer, got {value!r}")
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
        raise RequestError(f"`{name}` must be one of {', '.join(choices)}, got {value!r}")
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
        raise RequestError(f"{where}: unknown field(s) {', '.join(unknown)}")
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
    raise RequestError(f"{where}.type must be 'text' or 'image', got {item_type!r}")


def _parse_items(raw: Any, field_name: str, caps: ModelCaps, kind: Kind) -> list[Item]:
    if not isinstance(raw, list):
        raise RequestError(f"`{field_name}` must be a list, got {_kind(raw)}")
    if not raw:
        raise RequestError(f"`{field_name}` is empty")
    return [_parse_item(x, f"{field_name}[{i}]", caps, kind) for i, x in enumerate(raw)]


def _check_common(
    body: dict[str, Any], req: EmbedRequest, caps: ModelCaps, settings: Settings
) -> None:
    count = len(req.queries) + len(req.passages)
    if count > settings.max_items:
        raise RequestError(
            f"request has {count} inputs, the limit is {settings.max_items} (MAX_ITEMS_PER_REQUEST)"
        )
    dims = body.get("dimensions")
    if dims is not None:
        if not caps.dimensions:
            raise RequestError(f"`dimensions` is not supported by {caps.name}")
        if isinstance(dims, bool) or not isinstance(dims, int) or dims not in caps.dimensions:
            sizes = ", ".join(str(d) for d in caps.dimensions)
            raise RequestError(f"`dimensions` must be one of {sizes}, got {dims!r}")
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


def parse_predict(body: Any, caps: ModelCaps, settings: Settings) -> EmbedRequest:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_kind(body)}")
    known = {
        "queries", "passages", "query", "documents", "batch_size", "compute_scores",
        "instruction", "dimensions", "truncate", "encoding_format", "return_embeddings",
        "top_k", "model",
    }  # fmt: skip
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(f"unknown field(s): {', '.join(unknown)}")
    if "query" in body and "queries" in body:
        raise RequestError("give either `query` or `queries`, not both")
    if "documents" in body and "passages" in body:
        raise RequestError("give either `documents` or `passages`, not both")
    req = EmbedRequest()
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
    if not req.return_embeddings and not req.compute_scores:
        raise RequestError("nothing to return: `return_embeddings` is false and no scores asked")
    _check_common(body, req, caps, settings)
    return req


def parse_embeddings(body: Any, caps: ModelCaps, settings: Settings) -> EmbedRequest:
    """The OpenAI / NIM `/v1/embeddings` body."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {_kind(body)}")
    known = {
        "input", "model", "input_type", "encoding_format", "truncate", "dimensions", "user",
        "instruction",
    }  # fmt: skip
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(f"unknown field(s): {', '.join(unknown)}")
    model = body.get("model")
    if model is not None and model not in caps.model_ids:
        raise RequestError(f"`model` must be one of {', '.join(caps.model_ids)}, got {model!r}")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError(f"`user` must be a string, got {_kind(user)}")
    if "input" not in body:
        raise RequestError("`input` is required (a string or a list of strings)")
    input_type = body.get("input_type")
    if input_type is None:
        # NIM requires input_type for asymmetric models; OpenAI clients never send it, so
        # default to `query` (what an unlabeled call is most often: a search request).
        input_type = "query"
    if not isinstance(input_type, str) or input_type.lower() not in INPUT_TYPES:
        raise RequestError(f"`input_type` must be one of query, passage, got {input_type!r}")
    kind: Kind = "query" if input_type.lower() == "query" else "passage"
    raw = body["input"]
    if isinstance(raw, str):
        items = [_parse_item(raw, "input", caps, kind)]
    elif isinstance(raw, list):
        if not raw:
            raise RequestError("`input` is empty")
        if all(isinstance(x, int) and not isinstance(x, bool) for x in raw) or any(
            isinstance(x, list) for x in raw
        ):
            raise RequestError("`input` must be text: token-id arrays are not accepted")
        items = [_parse_item(x, f"input[{i}]", caps, kind) for i, x in enumerate(raw)]
        for i, item in enumerate(items):
            if item.image is not None and item.image.url and not item.image.url.startswith("data:"):
                raise RequestError(f"input[{i}]: images on /v1/embeddings are data: URLs")
    else:
        raise RequestError(f"`input` must be a string or a list of strings, got {_kind(raw)}")
    req = EmbedRequest(truncate="NONE")
    if kind == "query":
        req.queries = items
    else:
        req.passages = items
    req.encoding_format = _check_choice(body, "encoding_format", ENCODING_FORMATS, "float")
    req.truncate = _check_choice(body, "truncate", TRUNCATE_VALUES, "NONE")
    _check_common(body, req, caps, settings)
    return req
