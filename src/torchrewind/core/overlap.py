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
