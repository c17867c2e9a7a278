"""Documents -> packed samples of `seq_length` tokens: best fit over a bounded window of open bins.

Pure Python on lengths only, deterministic (ties go to the oldest bin), so the packing of a shard
is a function of its documents' lengths and order. Documents arrive in a seed-shuffled order;
each goes to the open bin it fills most tightly. When none has room a new bin opens; when more
than `window` bins are open the fullest is closed. The window bounds the work per document and
keeps documents near their arrival order (samples stay as mixed as the shuffled stream). At the
end the bins still open are re-packed first-fit-decreasing, which empties most of the half-filled
tail. On documents of a few hundred to a few thousand tokens and 32k bins this leaves well under
1% padding once a shard holds a few dozen samples' worth of tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_WINDOW = 64


def pack(lengths: Sequence[int], capacity: int, window: int = DEFAULT_WINDOW) -> list[list[int]]:
    """Indices into `lengths`, grouped into bins whose lengths sum to at most `capacity`.

    Every index appears exactly once; within a bin indices keep their arrival order.
    """
    if capacity < 1 or window < 1:
        raise ValueError(f"capacity and window must be positive, got {capacity}, {window}")
    closed: list[list[int]] = []
    open_bins: list[list[int]] = []  # items, in opening order
    free: list[int] = []  # remaining room of each open bin
    for i, n in enumerate(lengths):
        if not 0 < n <= capacity:
            raise ValueError(f"document {i} has {n} tokens, bins hold 1..{capacity}")
        best = -1
        for b, room in enumerate(free):
            if n <= room and (best < 0 or room < free[best]):
                best = b
        if best < 0:
            if len(open_bins) == window:
                fullest = min(range(len(free)), key=free.__getitem__)
                closed.append(open_bins.pop(fullest))
                free.pop(fullest)
            open_bins.append([])
            free.append(capacity)
            best = len(open_bins) - 1
        open_bins[best].append(i)
        free[best] -= n
        if free[best] == 0:
            closed.append(open_bins.pop(best))
            free.pop(best)
    closed.extend(_first_fit_decreasing([i for b in open_bins for i in b], lengths, capacity))
    return closed


def _first_fit_decreasing(items: list[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(items, key=lambda i: (-lengths[i], i)):
        b = next((b for b, room in enumerate(free) if lengths[i] <= room), len(bins))
        if b == len(bins):
            bins.append([])
            free.append(capacity)
        bins[b].append(i)
        free[b] -= lengths[i]
    return [sorted(b) for b in bins]
