"""Peak memory of a training step, measured: what the batch-size search compares with its budget.

* CUDA: the caching allocator's ``max_memory_allocated`` after ``reset_peak_memory_stats`` (every live tensor on the
  device counts, the model's, the optimizer's and anything else you keep there).
* CPU: PyTorch has no allocator statistics for CPU memory, and ``tracemalloc`` sees only Python's own allocations,
  not tensors. So the step runs under ``torch.distributed._tools.mem_tracker.MemTracker``, PyTorch's dispatch-mode
  memory tracker, which follows every tensor storage the step creates or frees (activations, gradients, optimizer
  state, temporaries) plus the registered parameters, buffers and optimizer state, and reports the peak of their sum.
  It slows the measured step down (a Python callback per operator) and does not see memory that bypasses tensors.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from ..errors import RewindError


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error from any device (CUDA raises ``torch.OutOfMemoryError``, the CPU allocator a
    ``RuntimeError`` saying it cannot allocate)."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def free_cached(device: torch.device) -> None:
    """Return what an out-of-memory step left behind (frames, cached blocks) before the next try."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_bytes(fn: Callable[[], Any], device: torch.device, track: tuple[Any, ...] = ()) -> tuple[Any, int]:
    """Run ``fn()`` and return ``(its result, peak bytes of tensor memory on device while it ran)``.

    Example::

        _, peak = peak_bytes(lambda: train_step(batch), torch.device("cpu"), track=(model, optimizer))

    ``track``: modules and optimizers whose existing tensors count towards the peak on CPU (created before ``fn``).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, int(torch.cuda.max_memory_allocated(device))
    if device.type != "cpu":
        raise RewindError(f"measuring peak memory on {device.type} is not supported (CPU and CUDA are).")
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as e:  # pragma: no cover - torch builds without distributed, or before 2.5
        raise RewindError(
            "measuring a step's peak CPU memory needs torch.distributed._tools.mem_tracker (torch >= 2.5 built with "
            "distributed support); on this build give max_batch_size= instead of max_bytes=."
        ) from e
    mt = MemTracker()
    if track:
        mt.track_external(*track)
    with mt:
        out = fn()
    peak = mt.get_tracker_snapshot("peak")
    return out, int(sum(v.get("Total", 0) for d, v in peak.items() if torch.device(d).type == "cpu"))
