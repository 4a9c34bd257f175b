"""The one place a batch's layout is chosen from a mode name (``fastrm.layout.MODES``)."""

from __future__ import annotations

import torch

from fastrm.layout.batches import MODES, BucketedBatch, PackedBatch, PaddedBatch, bucket, pack
from fastrm.layout.shared import SharedPrefixBatch, share

Batch = PaddedBatch | PackedBatch | BucketedBatch | SharedPrefixBatch


def arrange(batch: PaddedBatch, mode: str, device: torch.device | str | None = None) -> Batch:
    """``batch`` on ``device`` in the layout ``mode`` names (shared | packed | bucketed | padded): packed rows (each
    group's common prefix once with ``shared``, where ``batch.group_ids`` says which rows begin alike) are made where
    the batch is (a collated batch: on the host), length buckets on ``device`` (their size depends on it)."""
    if mode not in MODES:
        raise ValueError(f"layout mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode in ("shared", "packed"):
        out = share(batch) if mode == "shared" else pack(batch)
        return out.to(device) if device is not None else out
    if device is not None:
        batch = batch.to(device)
    return bucket(batch) if mode == "bucketed" else batch
