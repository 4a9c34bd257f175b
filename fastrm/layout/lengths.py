"""Length buckets: sequences of similar length grouped so that padding them costs little (used by the bucketed
layout, whole-model micro-batches, and by the packed row's per-bucket attention)."""

from __future__ import annotations

import math

# A bucket boundary is worth it when it saves more than this many padded tokens: the cost of one more forward and
# backward of the whole model.
BUCKET_OVERHEAD_TOKENS = {"cpu": 256, "cuda": 2048}
MAX_BUCKET_CANDIDATES = 256  # distinct lengths considered as bucket boundaries (keeps the partition O(256^2))


def length_buckets(lengths, overhead: float, power: int = 1) -> list[list[int]]:
    """Indices of ``lengths`` grouped into buckets of similar length, longest bucket first, each bucket's
    longest sequence first; the partition minimises ``sum over buckets (n_b * L_b**power + overhead)`` (``L_b``
    the bucket's longest length): the padded work of the buckets plus a fixed cost per bucket.

    Exact dynamic programme over the sorted lengths (a bucket is a run of them); boundaries are taken only
    where the length changes, at most ``MAX_BUCKET_CANDIDATES`` of them (evenly spread beyond that)."""
    lengths = [int(n) for n in lengths]
    if not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if math.isinf(overhead):
        return [order]
    sorted_lengths = [lengths[i] for i in order]
    starts = [0] + [k for k in range(1, len(order)) if sorted_lengths[k] != sorted_lengths[k - 1]]
    if len(starts) > MAX_BUCKET_CANDIDATES:
        step = len(starts) / MAX_BUCKET_CANDIDATES
        starts = sorted({starts[int(j * step)] for j in range(MAX_BUCKET_CANDIDATES)} | {0})
    bounds = starts + [len(order)]
    # best[k]: the cheapest split of sorted positions [0, bounds[k]); cut[k] where its last bucket starts
    best, cut = [0.0] + [float("inf")] * (len(bounds) - 1), [0] * len(bounds)
    for k in range(1, len(bounds)):
        for m in range(k):
            cost = best[m] + (bounds[k] - bounds[m]) * sorted_lengths[bounds[m]] ** power + overhead
            if cost < best[k]:
                best[k], cut[k] = cost, m
    buckets, k = [], len(bounds) - 1
    while k > 0:
        m = cut[k]
        buckets.append(order[bounds[m]:bounds[k]])
        k = m
    return buckets[::-1]
