"""Training metrics: averaged between logging steps and over ranks, written by rank 0 to metrics.jsonl and
TensorBoard."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from fastrm import distributed

log = logging.getLogger("fastrm")


class NullMetricsLogger:
    """What ranks other than 0 get: they compute metrics (collectives need them) but write nothing."""

    def log(self, step: int, metrics: dict):
        pass

    def close(self):
        pass


class MetricsLogger:
    """Appends one JSON object per logging step to ``metrics.jsonl`` and mirrors it to TensorBoard."""

    def __init__(self, out_dir: Path, tensorboard: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; metrics go to %s only", self.path)

    def log(self, step: int, metrics: dict):
        row = {"step": step, "time": time.time(), **{k: _scalar(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()


def _scalar(value):
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


class MetricsWindow:
    """Averages per-batch metric dicts between two logging steps and counts tokens for throughput."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.rows, self.tokens, self.start = [], 0, time.perf_counter()

    def add(self, metrics: dict, tokens: int):
        self.rows.append(metrics)
        self.tokens += tokens

    def summary(self) -> dict:
        """Window means; under DDP averaged over ranks too (tokens/s summed: the whole job's throughput)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        keys = list(self.rows[0])
        means = torch.stack([torch.stack([torch.as_tensor(r[k]).float().cpu() for r in self.rows]).mean()
                             for k in keys] + [torch.tensor(self.tokens / elapsed)])
        means = distributed.all_reduce_mean(means.double())
        out = {k: v.item() for k, v in zip(keys, means[:-1])}
        out["throughput/tokens_per_s"] = means[-1].item() * distributed.world_size()
        self.reset()
        return out


def mean_over_ranks(metrics: dict) -> dict:
    """Each metric (a number or a 0-d tensor) averaged over ranks; the metrics themselves with one process."""
    if distributed.world_size() == 1 or not metrics:
        return metrics
    keys = list(metrics)
    values = distributed.all_reduce_mean(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, values.tolist()))


def reduce_sums(*values: float) -> list[float]:
    """Sums over ranks of a few Python numbers (eval totals and counts); the numbers themselves with one process."""
    if distributed.world_size() == 1:
        return list(values)
    return distributed.all_reduce_sum(torch.tensor(values, dtype=torch.float64)).tolist()
