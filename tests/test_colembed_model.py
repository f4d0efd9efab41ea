"""ColEmbed-3B native model on tiny random checkpoints: loading, shapes, attention, images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from embed_serving.checkpoint import CheckpointError, load_tokenizer
from embed_serving.models import colembed
from embed_serving.models.colembed import (
    LLM_PREFIX_CAUSAL_LM,
    ColEmbed,
    build_passage_text,
    build_query_text,
    load_colembed,
    pixel_shuffle,
    write_tiny_checkpoint,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("colembed-tiny")
    write_tiny_checkpoint(path, seed=0)
    return path


@pytest.fixture(scope="module")
def loaded(ckpt: Path) -> tuple[ColEmbed, colembed.ColEmbedSpec, object]:
    model, spec = load_colembed(ckpt, "cpu", torch.float32, attn_implementation="sdpa")
    return model, spec, load_tokenizer(ckpt)


def _page(seed: int, width: int, height: int) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _encode(loaded, texts: list[str], pixel_values: torch.Tensor | None = None):
    model, _, tokenizer = loaded
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = model(batch["input_ids"], batch["attention_mask"], pixel_values)
    return out, batch


def _rewrite(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_tiny_checkpoint_round_trip(ckpt: Path, loaded, tmp_path: Path) -> None:
    model, spec, tokenizer = loaded
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["llm_config"]["vocab_size"] == len(tokenizer)
    assert spec.tokens_per_tile == (32 // 8) ** 2 // 4
    assert (spec.min_tiles, spec.max_tiles, spec.use_thumbnail) == (1, 4, True)
    assert spec.img_context_id == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert spec.img_start_id == tokenizer.convert_tokens_to_ids("<img>")
    assert spec.img_end_id == tokenizer.convert_tokens_to_ids("</img>")
    assert spec.hidden_size == model.hidden_size == raw["llm_config"]["hidden_size"]
    assert (spec.query_max_tokens, spec.passage_max_tokens) == (512, 10240)
    ids = tokenizer("query: hi")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1

    keys = set(load_file(str(ckpt / "model.safetensors")))
    assert keys == set(model.state_dict())
    assert "vision_model.vision_model.embeddings.patch_embedding.weight" in keys
    assert "vision_model.vision_model.head.probe" in keys  # SigLIP's pooling head is carried
    assert {"mlp1.0.weight", "mlp1.1.weight", "mlp1.3.weight"} <= keys
    assert "language_model.layers.0.self_attn.q_proj.weight" in keys
    for key in keys:  # loaded values are the stored ones, not a fresh init
        assert torch.equal(model.state_dict()[key], load_file(str(ckpt / "model.safetensors"))[key])

    again = tmp_path / "again"
    write_tiny_checkpoint(again, seed=0)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (again / name).read_bytes() == (ckpt / name).read_bytes()
    other = tmp_path / "other"
    write_tiny_checkpoint(other, seed=1)
    assert (other / "model.safetensors").read_bytes() != (ckpt / "model.safetensors").read_bytes()


def test_prompt_strings() -> None:
    assert build_query_text("what is x?") == "query: what is x?"
    assert build_passage_text("some text", None) == "passage: some text"
    image = "<img>" + "<IMG_CONTEXT>" * 3 + "</img>"
    assert build_passage_text(None, 3) == f"passage: {image} "
    assert build_passage_text("caption", 3) == f"passage: {image} caption"
    with pytest.raises(ValueError):
        build_passage_text(None, None)


def test_shape_and_per_token_norms(loaded) -> None:
    texts = ["query: a short one", "query: a much longer query about quarterly revenue tables"]
    out, batch = _encode(loaded, texts)
    mask = batch["attention_mask"].bool()
    assert out.shape == (*batch["input_ids"].shape, loaded[1].hidden_size)
    assert out.dtype == torch.float32
    norms = out.norm(dim=-1)
    torch.testing.assert_close(norms[mask], torch.ones(int(mask.sum())), atol=1e-5, rtol=0)
    assert not mask.all() and torch.all(out[~mask] == 0)


def test_attention_is_bidirectional(loaded) -> None:
    _, _, tokenizer = loaded
    ids = tokenizer(["query: the revenue in 2023"], return_tensors="pt")["input_ids"]
    changed = ids.clone()
    changed[0, -1] = tokenizer.convert_tokens_to_ids("<img>")
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        a = loaded[0](ids, mask)
        b = loaded[0](changed, mask)
    # A causal model would leave every earlier position untouched.
    assert (a[0, :-1] - b[0, :-1]).abs().max() > 1e-3


def test_images_change_text_token_outputs(loaded) -> None:
    _, spec, _ = loaded
    pages = [_page(1, 90, 40), _page(2, 90, 40)]
    pvs = [spec.pixel_values(p) for p in pages]
    assert pvs[0].shape == pvs[1].shape and pvs[0].shape[0] > 1
    text = spec.passage_text("quarterly revenue", pvs[0].shape[0])
    outs = [_encode(loaded, [text], pv)[0][0] for pv in pvs]
    ids = loaded[2](text)["input_ids"]
    text_pos = ids.index(spec.img_end_id) + 1
    assert (outs[0][text_pos:] - outs[1][text_pos:]).abs().max() > 1e-3
    image_pos = torch.tensor(ids) == spec.img_context_id
    assert (outs[0][image_pos] - outs[1][image_pos]).abs().max() > 1e-3


def test_batched_equals_one_at_a_time(loaded) -> None:
    _, spec, _ = loaded
    items: list[tuple[str, Image.Image | None]] = [
        (spec.query_text("what was the revenue?"), None),
        ("tall", _page(3, 30, 80)),
        (spec.passage_text("a text-only passage about late interaction scoring"), None),
        ("square", _page(4, 32, 32)),
        ("wide+text", _page(5, 120, 30)),
    ]
    texts, pixel_values = [], []
    for label, page in items:
        if page is None:
            texts.append(label)
            continue
        pv = spec.pixel_values(page)
        pixel_values.append(pv)
        texts.append(spec.passage_text("caption" if "text" in label else None, pv.shape[0]))
    assert len({pv.shape[0] for pv in pixel_values}) == 3  # 1, 3 and 4 tiles
    batched, batch = _encode(loaded, texts, torch.cat(pixel_values))
    lengths = batch["attention_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) == len(texts)
    pv_iter = iter(pixel_values)
    for i, (_, page) in enumerate(items):
        single, _ = _encode(loaded, [texts[i]], next(pv_iter) if page is not None else None)
        n = int(lengths[i])
        assert single.shape[1] == n
        assert (batched[i, :n] - single[0]).abs().max() < 1e-5
        assert torch.all(batched[i, n:] == 0)


def test_context_tokens_must_match_tiles(loaded) -> None:
    model, spec, tokenizer = loaded
    pv = spec.pixel_values(_page(6, 100, 30))
    batch = tokenizer([spec.passage_text(None, pv.shape[0])], return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.inference_mode():
        model(ids, mask, pv)
        with pytest.raises(ValueError, match="IMG_CONTEXT"):
            model(ids, mask, pv[:-1])
        with pytest.raises(ValueError, match="IMG_CONTEXT"):
            model(ids, mask, None)
        with pytest.raises(ValueError, match="pixel_values"):
            model(ids, mask, pv[:, :, :16, :16])


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda t: t.pop("mlp1.1.weight"), "mlp1.1.weight"),
        (lambda t: t.__setitem__("mlp1.9.weight", torch.zeros(2)), "mlp1.9.weight"),
        (
            lambda t: t.__setitem__(
                "language_model.norm.weight",
                torch.ones(t["language_model.norm.weight"].numel() + 1),
            ),
            "language_model.norm.weight",
        ),
        (
            lambda t: t.update(
                {
                    k.replace("language_model.", "llm.", 1): t.pop(k)
                    for k in list(t)
                    if "language" in k
                }
            ),
            "language model under 'language_model.*'",
        ),
    ],
    ids=["missing", "unexpected", "mis-shaped", "wrong-prefix"],
)
def test_strict_loading_names_the_tensor(ckpt: Path, tmp_path: Path, edit, named: str) -> None:
    broken = _rewrite(ckpt, tmp_path / "broken", edit)
    with pytest.raises(CheckpointError) as err:
        load_colembed(broken, "cpu", torch.float32)
    assert named in str(err.value)


def test_eagle_chat_layout_loads_to_the_same_model(loaded, tmp_path: Path) -> None:
    path = tmp_path / "causal-lm-layout"
    write_tiny_checkpoint(path, seed=0, llm_prefix=LLM_PREFIX_CAUSAL_LM)
    keys = set(load_file(str(path / "model.safetensors")))
    assert "language_model.model.layers.0.mlp.up_proj.weight" in keys
    assert "language_model.lm_head.weight" in keys  # ignored: an encoder never runs it
    model, spec = load_colembed(path, "cpu", torch.float32)
    pv = spec.pixel_values(_page(7, 64, 40))
    batch = loaded[2]([spec.passage_text("x", pv.shape[0])], return_tensors="pt")
    with torch.inference_mode():
        a = model(batch["input_ids"], batch["attention_mask"], pv)
        b = loaded[0](batch["input_ids"], batch["attention_mask"], pv)
    assert torch.equal(a, b)


def _internvl_pixel_shuffle(x: torch.Tensor, scale_factor: float, ps_version: str) -> torch.Tensor:
    # InternVL's InternVLChatModel.pixel_shuffle, verbatim apart from the ps_version argument.
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(
        n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor))
    )
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


def test_pixel_shuffle_matches_internvl() -> None:
    x = torch.randn(3, 6, 6, 5, generator=torch.Generator().manual_seed(0))
    for version in ("v1", "v2"):
        assert torch.equal(pixel_shuffle(x, 0.5, version), _internvl_pixel_shuffle(x, 0.5, version))
    # What v2 means: each output cell stacks its 2x2 input block, row-major.
    out = pixel_shuffle(x, 0.5)
    for i in range(3):
        for j in range(3):
            block = [x[:, 2 * i + di, 2 * j + dj] for di in range(2) for dj in range(2)]
            assert torch.equal(out[:, i, j], torch.cat(block, dim=-1))
    assert pixel_shuffle(torch.randn(1, 9, 9, 2), 1 / 3).shape == (1, 3, 3, 18)


def test_shapes_follow_the_config(tmp_path: Path) -> None:
    path = tmp_path / "other-sizes"
    write_tiny_checkpoint(
        path, seed=3, image_size=48, patch_size=8, vision_hidden=24, llm_hidden=64, max_tiles=6
    )
    model, spec = load_colembed(path, "cpu", torch.float32)
    tokenizer = load_tokenizer(path)
    assert spec.tokens_per_tile == 9 and spec.max_tiles == 6 and spec.hidden_size == 64
    assert model.mlp1[0].normalized_shape == (24 * 4,)
    pv = spec.pixel_values(_page(8, 200, 60))
    assert pv.shape[1:] == (3, 48, 48) and pv.shape[0] > 2
    batch = tokenizer([spec.passage_text("t", pv.shape[0])], return_tensors="pt")
    with torch.inference_mode():
        out = model(batch["input_ids"], batch["attention_mask"], pv)
    assert out.shape == (1, batch["input_ids"].shape[1], 64)
    assert torch.all((out.norm(dim=-1) - 1).abs() < 1e-5)


def test_force_image_size_interpolates_position_embeddings(ckpt: Path, tmp_path: Path) -> None:
    path = tmp_path / "forced"
    shutil.copytree(ckpt, path)
    raw = json.loads((path / "config.json").read_text())
    raw["force_image_size"] = 48  # tower trained at 32 px: 4x4 positions, resampled to 6x6
    (path / "config.json").write_text(json.dumps(raw))
    model, spec = load_colembed(path, "cpu", torch.float32)
    assert spec.image_size == 48 and spec.tokens_per_tile == 9
    pv = spec.pixel_values(_page(9, 48, 48))
    batch = load_tokenizer(path)([spec.passage_text(None, pv.shape[0])], return_tensors="pt")
    with torch.inference_mode():
        out = model(batch["input_ids"], batch["attention_mask"], pv)
    assert torch.isfinite(out).all()
