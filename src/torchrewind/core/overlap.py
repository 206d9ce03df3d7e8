"""Background copies of arenas into a snapshot slot, overlapped with forward and backward.

Between two optimizer steps a training loop only *reads* parameters and optimizer state (forward, backward,
gradient clipping), so the copy that records them for the next undo point can start right after one step and only
has to be complete before the next step writes. Buffers (BatchNorm statistics) do change during forward; the
caller re-copies their few bytes when it finishes the snapshot (see ``Recorder.refresh_buffers``).

* CPU arenas are copied by one worker thread: ``Tensor.copy_`` releases the GIL, so the copy runs while Python
  runs forward and backward.
* CUDA arenas are copied on a side stream that first waits for the current stream (so the copy sees the finished
  step); finishing makes the current stream wait for the copy, so the next step's kernels cannot overwrite the
  arena before it has been read. Slot buffers live as long as the ``Rewind``, so no ``record_stream`` is needed.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..errors import RewindError
from .snapshot import Recorder, Slot


def _copy_all(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for dst, src in pairs:
        dst.copy_(src)


class BackgroundCopy:
    """At most one copy job in flight: :meth:`start` it, then :meth:`finish` (wait for) it."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._future: Future | None = None
        self._events: list[tuple[torch.device, torch.cuda.Event]] = []
        self.pending = False

    def start(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Begin copying each ``src`` into its ``dst`` (same shapes)."""
        assert not self.pending, "finish() the previous copy first"
        cpu = []
        for dst, src in pairs:
            if src.device.type == "cuda":
                stream = self._streams.get(src.device)
                if stream is None:
                    stream = self._streams[src.device] = torch.cuda.Stream(src.device)
                stream.wait_stream(torch.cuda.current_stream(src.device))
                with torch.cuda.stream(stream):
                    dst.copy_(src, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
                self._events.append((src.device, ev))
            else:
                cpu.append((dst, src))
        if cpu:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torchrewind-copy")
            self._future = self._pool.submit(_copy_all, cpu)
        self.pending = True

    def finish(self) -> None:
        """Wait for the copy (CPU) / order the current stream after it (CUDA). Re-raises an error of the copy."""
        if not self.pending:
            return
        self.pending = False
        events, self._events = self._events, []
        for device, ev in events:
            torch.cuda.current_stream(device).wait_event(ev)
        fut, self._future = self._future, None
        if fut is not None:
            fut.result()

    def close(self) -> None:
        self.finish()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class OverlappedRecorder:
    """``Rewind(overlap=True)``: the record of the state after a step is copied in the background into a staging
    slot (ring slots stay intact until it is complete), started by the post-step hook and completed — buffers
    re-copied, the small state captured — just before the next step or by an undo. A copy whose state changed since
    it started (an undo, a re-bound tensor) is dropped and the point is recorded the ordinary way."""

    def __init__(self, recorder: Recorder) -> None:
        self._recorder = recorder
        self._copy = BackgroundCopy()
        self.staging = Slot()  # the copy's target; swapped with the ring slot it completes
        self._job: tuple[int, int] | None = None  # (point being copied, tracker generation at the start)

    @property
    def busy(self) -> bool:
        return self._job is not None

    def start(self, point: int) -> None:
        """After a step: begin copying the live state, to become ``point``."""
        if self._job is not None:
            return
        tracker = self._recorder.tracker
        try:
            tracker.ensure()  # e.g. bind the optimizer state the first step created
        except RewindError:
            return  # reported by the next snapshot, not by the step that already happened
        self._recorder.prepare(self.staging)
        self._copy.start(self._recorder.arena_pairs(self.staging))
        self._job = (point, tracker.generation)

    def settle(self) -> None:
        """Wait for a copy in flight and drop it (before anything else reads or writes the arenas)."""
        if self._job is not None:
            self._job = None
            self._copy.finish()

    def complete(self, point: int, clean: bool, step: int) -> Slot | None:
        """Finish the copy as the record of the live state as ``point`` (the live state has taken ``step`` steps).
        Returns the filled slot, or None (copy dropped) if the live state is no longer the one it started from."""
        if self._job is None:
            return None
        started, generation = self._job
        self.settle()
        if started != point or clean:
            return None
        tracker = self._recorder.tracker
        tracker.ensure()
        if tracker.generation != generation:
            return None  # tensors moved since the copy started
        slot = self.staging
        self._recorder.refresh_buffers(slot)  # forward changed them after the copy started
        self._recorder.capture_rest(slot)
        slot.step = step
        return slot

    def close(self) -> None:
        self.settle()
        self._copy.close()
