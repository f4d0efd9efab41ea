"""Cosine and MaxSim scoring against brute-force references."""

from __future__ import annotations

import pytest
import torch

from embed_serving.scoring import cosine_scores, maxsim_scores, top_k_indices


def _vectors(
    gen: torch.Generator, lengths: list[int], dim: int, *, offset: float = 0.0
) -> list[torch.Tensor]:
    return [torch.randn(n, dim, generator=gen, dtype=torch.float64) + offset for n in lengths]


def _brute_force(queries: list[torch.Tensor], passages: list[torch.Tensor]) -> torch.Tensor:
    """One pair at a time in float64: no padding, no batching."""
    out = torch.empty(len(queries), len(passages), dtype=torch.float64)
    for i, q in enumerate(queries):
        for j, p in enumerate(passages):
            out[i, j] = (q.double() @ p.double().T).max(dim=1).values.sum()
    return out


def _zero_padded_einsum(queries: list[torch.Tensor], passages: list[torch.Tensor]) -> torch.Tensor:
    """The colpali-engine / NVIDIA formulation: zero padding, then a plain max and sum."""
    q = torch.nn.utils.rnn.pad_sequence(queries, batch_first=True, padding_value=0)
    p = torch.nn.utils.rnn.pad_sequence(passages, batch_first=True, padding_value=0)
    return torch.einsum("bnd,csd->bcns", q, p).max(dim=3)[0].sum(dim=2)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def test_maxsim_matches_brute_force_on_variable_lengths(gen: torch.Generator) -> None:
    queries = _vectors(gen, [5, 1, 12, 7], 16)
    passages = _vectors(gen, [3, 40, 1, 17, 9, 26], 16)
    got = maxsim_scores([q.float() for q in queries], [p.float() for p in passages])
    assert got.dtype == torch.float32
    assert got.shape == (4, 6)
    torch.testing.assert_close(got.double(), _brute_force(queries, passages), atol=1e-4, rtol=0)


def test_negative_similarities_ignore_padding(gen: torch.Generator) -> None:
    # Queries and passages point in opposite directions, so every similarity is negative: a
    # zero-padded token would then be the "best match" of every query token.
    queries = [q.abs() + 0.1 for q in _vectors(gen, [4, 6, 2], 8)]
    passages = [-(p.abs() + 0.1) for p in _vectors(gen, [2, 11, 5, 8], 8)]
    reference = _brute_force(queries, passages)
    assert (reference < 0).all()

    got = maxsim_scores([q.float() for q in queries], [p.float() for p in passages])
    torch.testing.assert_close(got.double(), reference, atol=1e-4, rtol=0)

    # The zero-padding formulation gets every shorter-than-longest passage wrong (it scores 0).
    padded = _zero_padded_einsum(queries, passages)
    longest = max(range(len(passages)), key=lambda j: passages[j].shape[0])
    for j in range(len(passages)):
        if j == longest:
            torch.testing.assert_close(padded[:, j], reference[:, j])
        else:
            assert torch.all(padded[:, j] == 0)
            assert torch.all((padded[:, j] - reference[:, j]).abs() > 0.1)


@pytest.mark.parametrize("max_elements", [1, 7, 100, 1_000, 50_000])
def test_chunking_does_not_change_scores(gen: torch.Generator, max_elements: int) -> None:
    queries = [q.float() for q in _vectors(gen, [3, 9, 1, 6, 4], 12)]
    passages = [p.float() for p in _vectors(gen, [1, 30, 2, 15, 15, 8, 64, 5, 3], 12)]
    whole = maxsim_scores(queries, passages, max_elements=2**30)
    chunked = maxsim_scores(queries, passages, max_elements=max_elements)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked.double(), _brute_force(queries, passages), atol=1e-4, rtol=0)


def test_chunks_respect_the_element_budget(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Record every buffer maxsim allocates and every similarity block the GEMM writes.
    dim, budget = 8, 600
    queries = [q.float() for q in _vectors(gen, [3, 5, 2, 4], dim)]
    passages = [p.float() for p in _vectors(gen, [10, 20, 3, 40, 7, 12, 25], dim)]
    allocated: list[int] = []
    blocks: list[int] = []
    real_empty, real_mm = torch.empty, torch.mm

    def empty_spy(*args: object, **kwargs: object) -> torch.Tensor:
        out = real_empty(*args, **kwargs)
        allocated.append(out.numel())
        return out

    def mm_spy(a: torch.Tensor, b: torch.Tensor, **kwargs: object) -> torch.Tensor:
        out = real_mm(a, b, **kwargs)
        blocks.append(out.numel())
        return out

    monkeypatch.setattr(torch, "empty", empty_spy)
    monkeypatch.setattr(torch, "mm", mm_spy)
    got = maxsim_scores(queries, passages, max_elements=budget)
    monkeypatch.undo()

    assert len(blocks) > 1  # the budget forced several chunks
    assert max(blocks) <= budget
    assert allocated and max(allocated) <= budget
    whole_problem = 4 * 5 * 7 * 40
    assert whole_problem > 4 * budget  # so the bound above is not trivially met
    torch.testing.assert_close(got.double(), _brute_force(queries, passages), atol=1e-4, rtol=0)


def test_low_precision_inputs_accumulate_in_fp32(gen: torch.Generator) -> None:
    # Long queries of similar terms: summing 512 per-token maxima in bf16 would lose ~2 digits.
    dim = 64
    queries = _vectors(gen, [512, 300], dim, offset=0.5)
    passages = _vectors(gen, [40, 90, 7], dim, offset=0.5)
    q16 = [q.to(torch.bfloat16) for q in queries]
    p16 = [p.to(torch.bfloat16) for p in passages]
    got = maxsim_scores(q16, p16, max_elements=5_000)
    assert got.dtype == torch.float32
    # The reference sees exactly the bf16-rounded inputs, so only accumulation can differ.
    reference = _brute_force(q16, p16)
    torch.testing.assert_close(got.double(), reference, atol=0, rtol=1e-5)
    naive = torch.stack(
        [
            torch.stack([(q @ p.T).max(dim=1).values.sum() for p in p16])  # all in bf16
            for q in q16
        ]
    )
    assert ((naive.double() - reference).abs() / reference.abs()).max() > 1e-4


def test_single_token_edges(gen: torch.Generator) -> None:
    q = torch.randn(1, 4, generator=gen)
    p = torch.randn(1, 4, generator=gen)
    got = maxsim_scores([q], [p])
    torch.testing.assert_close(got, (q @ p.T).reshape(1, 1))


def test_empty_inputs_give_empty_scores() -> None:
    p = [torch.randn(3, 4)]
    assert maxsim_scores([], p).shape == (0, 1)
    assert maxsim_scores(p, []).shape == (1, 0)
    assert maxsim_scores([], []).shape == (0, 0)


@pytest.mark.parametrize(
    ("queries", "passages", "message"),
    [
        ([torch.zeros(0, 4)], [torch.ones(2, 4)], r"queries\[0\]: has no token vectors"),
        ([torch.ones(2, 4)], [torch.ones(2, 4), torch.ones(3)], r"passages\[1\]: expected"),
        ([torch.ones(2, 4)], [torch.ones(2, 5)], "dimension 4"),
    ],
)
def test_maxsim_rejects_malformed_inputs(
    queries: list[torch.Tensor], passages: list[torch.Tensor], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        maxsim_scores(queries, passages)


def test_maxsim_result_is_on_the_inputs_device() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = [torch.randn(3, 8, device=device)]
    p = [torch.randn(5, 8, device=device), torch.randn(2, 8, device=device)]
    got = maxsim_scores(q, p)
    assert got.device.type == device
    torch.testing.assert_close(
        got.cpu().double(), _brute_force([q[0].cpu()], [t.cpu() for t in p]), atol=1e-4, rtol=0
    )


def test_cosine_scores_fp32(gen: torch.Generator) -> None:
    q = torch.nn.functional.normalize(torch.randn(3, 32, generator=gen), dim=1)
    p = torch.nn.functional.normalize(torch.randn(5, 32, generator=gen), dim=1)
    got = cosine_scores(q.to(torch.bfloat16), p.to(torch.bfloat16))
    assert got.dtype == torch.float32
    expected = q.to(torch.bfloat16).double() @ p.to(torch.bfloat16).double().T
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(cosine_scores(q, q).diagonal(), torch.ones(3))


def test_cosine_scores_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="dimension mismatch"):
        cosine_scores(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="2-D"):
        cosine_scores(torch.ones(3), torch.ones(2, 3))


def test_top_k_ranks_best_first_with_stable_ties() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0]])
    assert top_k_indices(scores, 3) == [[1, 3, 2], [0, 1, 2]]
    assert top_k_indices(scores, 10) == [[1, 3, 2, 4, 0], [0, 1, 2, 3, 4]]
    assert top_k_indices(scores, 0) == [[], []]


def test_top_k_ties_stay_stable_on_large_rows() -> None:
    # torch.topk and unstable sorts reorder ties on longer rows; ours must not.
    scores = torch.zeros(2, 5000)
    scores[1, 4000:] = 1.0
    assert top_k_indices(scores, 5000)[0] == list(range(5000))
    assert top_k_indices(scores, 1001)[1] == [*range(4000, 5000), 0]


def test_top_k_nan_ranks_last_and_bad_args_raise() -> None:
    scores = torch.tensor([[float("nan"), 0.2, -1.0]])
    assert top_k_indices(scores, 3) == [[1, 2, 0]]
    with pytest.raises(ValueError):
        top_k_indices(scores, -1)
    with pytest.raises(ValueError):
        top_k_indices(torch.ones(3), 1)
