"""The core: tensors re-homed into arenas (:mod:`.arena`, :mod:`.tracker`), one recorded state and its capture and
restore (:mod:`.snapshot`, :mod:`.values`, :mod:`.rng`), the ring of recorded points (:mod:`.history`) and the
overlapped background copy (:mod:`.overlap`). Nothing here is public API: use :class:`torchrewind.Rewind`."""
