"""Length-sorted micro-batching.

Sorting by token count before padding keeps padding (pure waste on a GPU) small; each forward
pass is capped both in items and in padded tokens (items x longest), which bounds activation
memory whatever the mix of lengths. Results are put back in input order by the caller.
"""

from __future__ import annotations


def plan_batches(lengths: list[int], max_items: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped into batches, longest first.

    A batch grows while `len(batch) * longest <= max_tokens`, `len(batch) <= max_items` and the
    next input is at least half as long as the batch's longest (so no row is more than half
    padding); an input longer than `max_tokens` on its own still gets a batch of one (the
    per-input limit, not the batch budget, decides whether it is accepted).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        # Sorted descending: the first item of a batch is its longest.
        longest = longest if current else lengths[i]
        full = len(current) + 1 > max_items or (len(current) + 1) * longest > max_tokens
        if current and (full or 2 * lengths[i] < longest):
            batches.append(current)
            current, longest = [], lengths[i]
        current.append(i)
    if current:
        batches.append(current)
    return batches


def padding_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of padded positions in the planned batches (0 = no waste)."""
    real = sum(lengths)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 0.0 if padded == 0 else 1.0 - real / padded
