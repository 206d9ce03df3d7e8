"""The disk tier: periodic, atomic, checksummed checkpoints of the training state for long-horizon rollback, and for
resuming after a crash.

A checkpoint is a *state tree* (nested dicts/lists/tuples of tensors and plain Python values, e.g.
``{"model": [sd], "optimizer": opt.state_dict(), ...}``) written as three files in ``step_<n>/``:

* ``tensors.bin``: every tensor's bytes, 64-byte aligned, one after the other. A save first copies the tensors into
  one reused host staging buffer (the only part that stalls training); a background thread starts writing it with
  large sequential writes as soon as the first block is copied (this rank's shards under FSDP2: one directory per
  rank);
* ``skeleton.json``: format version, the structure, Python values, dict key types and the tensor table;
* ``manifest.json``: a checksum of every 16 MiB block (``BLOCK``; the size is recorded) of both files (xxh3-128 with ``xxhash`` installed, else CRC-32
  from the standard library) and their sizes, written last.

Atomicity: everything is written into ``step_<n>.tmp-<pid>/``, fsynced, then renamed to ``step_<n>/`` — the rename is
the completion marker, so a crash (even ``kill -9``) mid-save leaves only a temp directory that is ignored and
removed by the next save.

Safety: nothing is unpickled (JSON and raw bytes only). Every block is checked against the manifest while it is
read, and nothing is returned before all of them matched. Checksums detect corruption and torn writes; they are not
signatures.

Restart: a directory that already holds checkpoints belongs to an earlier run. It is never deleted silently:
``DiskCheckpoints(dir)`` refuses it; ``resume=True`` keeps it (``rw.rollback_to(ck.latest)`` continues from the newest
checkpoint, the live step included); ``overwrite=True`` deletes it.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import shutil
import threading
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._checks import check_bool, check_int, check_optional_int
from ..distributed import local, rank_and_world
from ..errors import RewindError, RewindValueError
from .checksum import have_xxhash, xxhash_or_refuse

FORMAT = 2  # 1: torch.distributed.checkpoint files + SHA-256 manifest (torchrewind 0.1); 2: this one
ALIGN = 64
BLOCK = 16 << 20  # bytes per checksummed block: the unit of the save pipeline and of parallel verified reads
SYNC_EVERY = 64 << 20  # a save flushes what it wrote so far this often (durable sooner: measured 0.69 vs 0.74 s)
PAGE = 4096  # tensors.bin is padded to, and its buffers aligned at, this: O_DIRECT I/O needs both
_DIR = re.compile(r"^step_(\d+)$")
_TMP = re.compile(r"^step_(\d+)\.(tmp|trash)-\d+$")
DATA, SKELETON, MANIFEST = "tensors.bin", "skeleton.json", "manifest.json"


# ------------------------------------------------------------------------------------------------ checksums
def _hasher() -> str:
    return "xxh3_128" if have_xxhash() else "crc32"


def _digest(algo: str, data: Any) -> str:
    if algo == "xxh3_128":
        xxhash = xxhash_or_refuse("DiskCheckpoints: this checkpoint", "pip install 'torchrewind[disk]'")
        return xxhash.xxh3_128_hexdigest(data)
    if algo == "crc32":
        return f"{zlib.crc32(data):08x}"
    raise RewindError(f"DiskCheckpoints: unknown checksum {algo!r} in the manifest; not loading it.")


class _Checksums:
    """Per-BLOCK checksums of a buffer that is filled front to back: :meth:`feed` hashes the bytes that became ready
    (while they are still in cache, right after they were copied), block by block."""

    def __init__(self, algo: str, mv: memoryview) -> None:
        self.algo, self.mv, self.pos, self.blocks = algo, mv, 0, []
        self._state: Any = None

    def feed(self, ready: int) -> None:
        while self.pos < ready:
            end = min(ready, (self.pos // BLOCK + 1) * BLOCK)
            part = self.mv[self.pos : end]
            if self.algo == "xxh3_128":
                import xxhash

                if self._state is None:
                    self._state = xxhash.xxh3_128()
                self._state.update(part)
            else:
                self._state = zlib.crc32(part, self._state or 0)
            self.pos = end
            if end % BLOCK == 0 or end == len(self.mv):
                st, self._state = self._state, None
                self.blocks.append(st.hexdigest() if self.algo == "xxh3_128" else f"{st:08x}")


class _Progress:
    """How many bytes of the staging buffer are ready, shared by the copying thread and the writing thread (so the
    write starts with the first block instead of after the whole copy). The writer is woken only when what it waits
    for is there: each wake-up costs the copying thread a GIL hand-over (measured: 70 ms per 0.3 GB when woken at
    every 4 MiB)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.ready = 0
        self.want = 0  # what the writer waits for
        self.done = False
        self.failed: BaseException | None = None
        self.blocks: list[str] = []  # checksums, set when done

    def publish(self, ready: int, blocks: list[str] | None = None) -> None:
        with self._cond:
            self.ready = ready
            if blocks is not None:
                self.blocks, self.done = blocks, True
            if self.done or ready >= self.want:
                self._cond.notify_all()

    def abort(self, err: BaseException) -> None:
        with self._cond:
            self.failed = err
            self._cond.notify_all()

    def wait_for(self, n: int) -> int:
        """Block until at least ``n`` bytes are ready (or all are); the number ready."""
        with self._cond:
            self.want = n
            while self.ready < n and not self.done and self.failed is None:
                self._cond.wait()
            if self.failed is not None:
                raise RewindError(f"DiskCheckpoints: the save was abandoned ({self.failed})")
            return self.ready


def _memview(t: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous CPU uint8 tensor's bytes (no numpy needed)."""
    n = t.numel()
    if n == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


# ------------------------------------------------------------------------------------------------ files
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Take a checkpoint out of the listing now (rename: atomic) and delete its files in the background:
    unlinking a GB-sized file takes a noticeable fraction of a second on some file systems."""
    trash = path.with_name(f"{path.name}.trash-{os.getpid()}")
    try:
        os.rename(path, trash)
    except OSError:
        return
    threading.Thread(target=shutil.rmtree, args=(trash,), kwargs={"ignore_errors": True}, daemon=True).start()


def _open(path: Path, flags: int, direct: bool) -> int:
    """Open with O_DIRECT where asked and supported (the bytes go from our buffer to the disk: no page-cache copy,
    which costs the training loop CPU time and evicts its memory), else buffered (e.g. tmpfs refuses O_DIRECT)."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644)
        except OSError:
            if flags & os.O_CREAT and path.exists():
                path.unlink()
    return os.open(path, flags, 0o644)


def _write_file(path: Path, data: bytes, algo: str) -> dict[str, Any]:
    """Write a small file (skeleton, manifest) and fsync it. Returns its manifest entry."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        mv = memoryview(data)
        while mv:
            mv = mv[os.write(fd, mv) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"size": len(data), "blocks": [_digest(algo, data[s : s + BLOCK]) for s in range(0, len(data), BLOCK)]}


def _stream_file(path: Path, mv: memoryview, progress: _Progress, direct: bool) -> None:
    """Write ``mv`` (page-aligned) as it becomes ready: each ready stretch with one large ``pwrite`` straight from the
    buffer (O_DIRECT where the file system allows: no page-cache copy), flushed every SYNC_EVERY bytes and at the end.
    Where the time goes (0.3 GB, measured): the writes keep pace with the copy (they land in the device's cache);
    the flush that makes them durable is the long part, so it starts while the copy is still going."""
    sync = os.fdatasync if hasattr(os, "fdatasync") else os.fsync
    fd = _open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, direct)
    try:
        pos = synced = 0
        while pos < len(mv):
            ready = progress.wait_for(min(pos + BLOCK, len(mv)))
            end = ready if ready == len(mv) else ready // PAGE * PAGE
            part = mv[pos:end]
            while part:
                n = os.pwrite(fd, part, pos)
                part, pos = part[n:], pos + n
            if pos - synced >= SYNC_EVERY and pos < len(mv):
                sync(fd)
                synced = pos
        sync(fd)
    finally:
        os.close(fd)


def _read_file(
    path: Path, mv: memoryview, info: dict[str, Any], algo: str, threads: int, direct: bool = False, block: int = BLOCK
) -> None:
    """Read ``path`` into ``mv`` (blocks in parallel, each verified right after it arrived, while the other threads'
    reads are in flight); RewindError on a mismatch. ``direct``: ``mv`` is page-aligned in address and length, so
    O_DIRECT may be used (no page-cache copy)."""
    if len(mv) != info.get("size") or len(info.get("blocks", ())) != -(-len(mv) // block):
        raise RewindError(f"DiskCheckpoints: {path} does not match its manifest; not loading it.")
    fd = _open(path, os.O_RDONLY, direct)
    try:
        if os.fstat(fd).st_size != len(mv):
            raise RewindError(f"DiskCheckpoints: {path} is {os.fstat(fd).st_size} bytes, expected {len(mv)} (torn write).")

        def one(i: int) -> None:
            s = i * block
            part, off = mv[s : s + block], s
            while part:
                n = os.preadv(fd, [part], off)
                if n <= 0:
                    raise RewindError(f"DiskCheckpoints: {path} ended early (torn write).")
                part, off = part[n:], off + n
            if _digest(algo, mv[s : s + block]) != info["blocks"][i]:
                raise RewindError(f"DiskCheckpoints: {path} is corrupt (checksum mismatch at byte {s}); not loading it.")

        n = len(info["blocks"])
        if threads > 1 and n > 1:
            with ThreadPoolExecutor(min(threads, n)) as pool:
                list(pool.map(one, range(n)))
        else:
            for i in range(n):
                one(i)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ the tree <-> JSON
def _split(tree: Any, tensors: list[torch.Tensor], path: str) -> Any:
    """JSON skeleton of ``tree``; its tensors (this rank's local parts) are appended to ``tensors``."""
    if isinstance(tree, torch.Tensor):
        tree = local(tree).detach()  # FSDP2: this rank's shard (each rank writes its own checkpoint)
        if tree.layout != torch.strided or tree.is_quantized:
            raise RewindValueError(f"DiskCheckpoints: {path} is a {tree.layout} tensor; only dense tensors can be saved.")
        tensors.append(tree)
        return {"__tensor__": len(tensors) - 1}
    if tree is None or isinstance(tree, (bool, int, str)):
        return tree
    if isinstance(tree, float):
        return tree if math.isfinite(tree) else {"__float__": repr(tree)}
    if isinstance(tree, torch.dtype):
        return {"__dtype__": str(tree).removeprefix("torch.")}
    if isinstance(tree, (list, tuple)):
        items = [_split(v, tensors, f"{path}[{i}]") for i, v in enumerate(tree)]
        return items if isinstance(tree, list) else {"__tuple__": items}
    if isinstance(tree, dict):
        out = []
        for k, v in tree.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise RewindValueError(f"DiskCheckpoints: {path} has a key {k!r}; only str and int keys can be saved.")
            out.append([k, _split(v, tensors, f"{path}[{k!r}]")])
        return {"__dict__": out}
    raise RewindValueError(
        f"DiskCheckpoints: {path} is a {type(tree).__name__}, which cannot be saved safely (only tensors, numbers, "
        "strings, None and lists/tuples/dicts of them); keep it out of the state_dict."
    )


def _join(skel: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(skel, list):
        return [_join(v, tensors) for v in skel]
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return tensors[skel["__tensor__"]]
        if "__float__" in skel:
            return float(skel["__float__"])
        if "__dtype__" in skel:
            return _dtype(skel["__dtype__"])
        if "__tuple__" in skel:
            return tuple(_join(v, tensors) for v in skel["__tuple__"])
        return {k: _join(v, tensors) for k, v in skel["__dict__"]}
    return skel


def _dtype(name: Any) -> torch.dtype:
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype):
        raise RewindError(f"DiskCheckpoints: unknown dtype {name!r} in the checkpoint; not loading it.")
    return dt


def _layout(tensors: list[torch.Tensor], arenas: Sequence[torch.Tensor] = ()) -> tuple[list[list], int, list[tuple]]:
    """Where each tensor goes in ``tensors.bin``: ``[dtype, shape, offset, nbytes]`` per tensor, the total bytes, and
    the arena images ``(words, offset, nbytes)``.

    Each arena (its used bytes, ``arenas``) is written whole, page-aligned, first: a tensor that lives in one is
    found at its place in that image (no copy of its own). The rest follow, 64-byte aligned. A save then copies one
    block per arena, and a restore into the same arenas copies them back the same way (see :func:`restore_plan`)."""
    images, off = [], 0
    for w in arenas:
        n = w.numel() * w.element_size()
        if n:
            images.append((w, off, n))
            off = -(-(off + n) // PAGE) * PAGE
    table = []
    for t in tensors:
        n = t.numel() * t.element_size()
        place = None
        if n and t.is_contiguous():
            p = t.data_ptr()
            for w, base, size in images:
                lo = w.data_ptr()
                if w.device == t.device and lo <= p and p + n <= lo + size and (p - lo) % ALIGN == 0:
                    place = base + p - lo
                    break
        if place is None:
            place = off
            off += (n + ALIGN - 1) // ALIGN * ALIGN
        table.append([str(t.dtype).removeprefix("torch."), list(t.shape), place, n])
    return table, off, images


def _copy(dst: torch.Tensor, src: torch.Tensor, cuda: bool) -> None:
    """dst <- src, byte for byte. On the CPU one single-threaded memmove (GIL released): torch's parallel copy_ runs
    a thread barrier per call, which costs milliseconds each when the other cores are busy (measured: 24 copies of
    12 MB, 0.19 s with 2 threads vs 0.06 s with one, on 2 loaded cores)."""
    if not cuda and dst.is_contiguous() and src.is_contiguous() and src.device.type == "cpu":
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), dst.numel() * dst.element_size())
    else:
        dst.copy_(src, non_blocking=cuda)


def _stage(
    tensors: list[torch.Tensor], table: list[list], images: list[tuple], data: torch.Tensor, progress: _Progress,
    algo: str, cuda: bool,
) -> None:  # fmt: skip
    """Fill ``data`` front to back: the arena images (in BLOCK-sized pieces), then the other tensors; checksum each
    stretch right after its copy (still in cache) and tell the writer how far it may go. Gaps (alignment, padding)
    are zeroed: the file's bytes depend on the state only."""
    sums = _Checksums(algo, _memview(data))
    pos = 0

    def ready(upto: int, force: bool = False) -> None:
        if not cuda and (force or upto - sums.pos >= BLOCK // 4):
            sums.feed(upto)
            progress.publish(upto)

    with torch.no_grad():
        for w, base, n in images:
            if base > pos:
                data[pos:base].zero_()
            src = w.view(torch.uint8)
            for a in range(0, n, BLOCK):  # in pieces: the writer starts on the first one
                b = min(a + BLOCK, n)
                _copy(data[base + a : base + b], src[a:b], cuda)
                ready(base + b, force=True)
            pos = base + n
        end = pos
        for t, (_, shape, off, n) in zip(tensors, table):
            if off < end or not n:
                continue  # inside an arena image
            if off > pos:
                data[pos:off].zero_()
            dst = data[off : off + n].view(t.dtype).view(t.shape)
            if n > BLOCK and not cuda and t.is_contiguous():
                src, flat = t.reshape(-1).view(torch.uint8), dst.reshape(-1).view(torch.uint8)
                for a in range(0, n, BLOCK):
                    _copy(flat[a : a + BLOCK], src[a : a + BLOCK], cuda)
                    ready(off + min(a + BLOCK, n), force=True)
            else:
                _copy(dst, t, cuda)
            pos = off + n
            ready(pos)
        data[pos:].zero_()
    if cuda:
        torch.cuda.synchronize()  # the device-to-host copies were asynchronous
    sums.feed(data.numel())
    progress.publish(data.numel(), sums.blocks)


# ------------------------------------------------------------------------------------------------ the tier
class DiskCheckpoints:
    """Every ``every``-th step's state on disk; keeps the last ``keep_last`` plus every ``keep_every``-th.

    A save copies the tensors into one host staging buffer (kept and reused) and, with ``async_save``, writes it in a
    background thread while training goes on. A directory that already holds checkpoints is refused unless you say
    what to do with them: ``resume=True`` continues the earlier run (restore with ``rw.rollback_to(ck.latest)``
    before training), ``overwrite=True`` deletes them.

    Example::

        ck = DiskCheckpoints("ckpt/", every=50, keep_last=10, resume=True)
        rw = Rewind(model, opt, tiers=Tiers(device=2, disk=ck))
        start = rw.rollback_to(ck.latest or 0)   # after a crash: the newest checkpoint (0 in a fresh directory)
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        every: int = 50,
        keep_last: int = 10,
        keep_every: int | None = None,
        async_save: bool = True,
        resume: bool = False,
        overwrite: bool = False,
        threads: int | None = None,
    ) -> None:
        who = "DiskCheckpoints"
        check_int("every", every, 1, who)
        check_int("keep_last", keep_last, 1, who)
        check_optional_int("keep_every", keep_every, 1, who)
        check_bool("async_save", async_save, who)
        check_bool("resume", resume, who)
        check_bool("overwrite", overwrite, who)
        check_optional_int("threads", threads, 1, who)
        if resume and overwrite:
            raise RewindValueError("DiskCheckpoints: resume=True and overwrite=True contradict each other; pick one.")
        if not isinstance(directory, (str, os.PathLike)):
            raise RewindValueError(f"DiskCheckpoints: directory must be a path, got {type(directory).__name__}.")
        self.root = Path(directory)
        self.every, self.keep_last, self.keep_every = every, keep_last, keep_every
        self.async_save = async_save
        self.resume, self.overwrite = resume, overwrite
        self.threads = threads or 4  # parallel block reads on restore, I/O-bound: 4 x 16 MiB in flight measured best
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._staging: torch.Tensor | None = None  # reused host buffer: save's source, load's destination
        self._pending: int | None = None  # step of the save in flight
        self.dir: Path | None = None
        self._newest: int | None = None
        self._earlier: set[int] = set()  # steps of an earlier run (resume=True) not restored from yet
        self._resumed = False  # a checkpoint of this directory was loaded: its later steps may be replaced
        self.bind_rank()

    def bind_rank(self) -> None:
        """Under torch.distributed with several ranks, each rank keeps its checkpoints in ``<directory>/rank<r>/``
        (its own shards under FSDP2, its replica under DDP: no cross-rank collision, works on node-local disks).
        Called at construction and again by :class:`~torchrewind.Rewind` (the process group may start later)."""
        if self._thread is not None:
            return  # a save is in flight: its directory stays
        rank, world = rank_and_world()
        d = self.root / f"rank{rank}" if world > 1 else self.root
        if d == self.dir:
            return
        d.mkdir(parents=True, exist_ok=True)
        self.dir = d
        found = self.steps()
        if found and not self.resume:
            if not self.overwrite:
                raise RewindValueError(
                    f"DiskCheckpoints: {d} already holds checkpoints of steps {_brief(found)} (an earlier run). "
                    "Pass resume=True to continue from them (then rw.rollback_to(ck.latest) before training), "
                    "overwrite=True to delete them, or choose another directory."
                )
            for s in found:
                _remove(self._path(s))
            found = []
        self._earlier = set(found)
        self._resumed = False
        # newest complete step: lets discard_after, called at every recorded step, skip listing the directory
        self._newest = max(found, default=None)

    # ------------------------------------------------------------------ queries
    def due(self, step: int) -> bool:
        return step % self.every == 0

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _DIR.match(p.name)) and p.is_dir())

    @property
    def latest(self) -> int | None:
        """The newest complete checkpoint's step, or None (e.g. ``rw.rollback_to(ck.latest or 0)`` to resume)."""
        self.wait()
        return max(self.steps(), default=None)

    def latest_at_or_before(self, step: int) -> int | None:
        return max((s for s in self.steps() if s <= step), default=None)

    def resumable_after(self, step: int) -> list[int]:
        """Steps of an earlier run of this directory (``resume=True``), not replaced since, that are newer than the
        live ``step`` — or equal to it before anything was restored (a fresh process's step 0 is only its initial
        state): :meth:`Rewind.rollback_to` may go *forward* to them."""
        return sorted(s for s in self._earlier if s > step or (s == step and not self._resumed))

    @property
    def nbytes(self) -> int:
        total = 0
        for s in self.steps():
            try:  # retention in a background save may delete a checkpoint while we look
                total += sum(f.stat().st_size for f in self._path(s).iterdir())
            except FileNotFoundError:
                pass
        return total

    def path(self, step: int) -> Path:
        """The directory of step ``step``'s checkpoint (complete once :meth:`steps` lists it)."""
        return self._path(step)

    @property
    def saving(self) -> bool:
        """True while a background save is being written."""
        return self._thread is not None and self._thread.is_alive()

    def _path(self, step: int) -> Path:
        return self.dir / f"step_{step:09d}"

    # ------------------------------------------------------------------ writing
    def save(self, step: int, tree: Any, *, arenas: Sequence[torch.Tensor] = ()) -> None:
        """Write ``tree`` as step ``step``. Tensors are copied to host memory before this returns (so training can
        go on); with ``async_save`` the files are written by a background thread (:meth:`wait` for it).

        ``arenas``: the used bytes of the arenas the tree's tensors live in (:class:`Rewind` passes them): each is
        copied as one block, and a restore into the same arenas copies it back as one. The copy is pipelined with
        the write: a background thread writes the first block while the next ones are copied, and each block is
        checksummed right after its copy, while it is still in cache. Nothing keeps a reference to ``arenas``."""
        check_int("step", step, 0, "DiskCheckpoints.save")
        self.wait()  # the previous save is complete: the staging buffer can be reused
        tensors: list[torch.Tensor] = []
        skeleton = _split(tree, tensors, "tree")  # validates everything before touching the disk
        table, total, images = _layout(tensors, arenas)
        head = {"format": FORMAT, "step": step, "tensors": table, "data_bytes": total, "tree": skeleton,
                "arenas": [[base, n] for _, base, n in images]}  # fmt: skip
        header = json.dumps(head, allow_nan=False).encode()
        padded = -(-total // PAGE) * PAGE
        cuda = any(t.device.type == "cuda" for t in [*tensors, *arenas])
        staging = self._buffer(padded, pin=cuda)
        data = staging[:padded]
        progress = _Progress()
        self._pending = step
        self._thread = threading.Thread(target=self._write_guarded, args=(step, header, data, progress), daemon=True)
        self._thread.start()
        try:
            _stage(tensors, table, images, data, progress, _hasher(), cuda)
        except BaseException as e:
            progress.abort(e)
            self._thread.join()
            self._thread, self._pending, self._error = None, None, None
            raise
        finally:
            del images  # no reference to the arenas may outlive the call (their use count detects changes)
        if not self.async_save:
            self.wait()

    def _buffer(self, nbytes: int, pin: bool = False) -> torch.Tensor:
        if self._staging is None or self._staging.numel() < nbytes:
            self._staging = None  # free the old one first: the peak stays at one buffer
            self._staging = _aligned(nbytes, pin)
        return self._staging

    def wait(self) -> None:
        """Block until a pending save is complete; re-raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._pending = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RewindError(f"DiskCheckpoints: a background save failed: {err}") from err

    def _write_guarded(self, step: int, header: bytes, data: torch.Tensor, progress: _Progress) -> None:
        try:
            self._write(step, header, data, progress)
        except BaseException as e:  # reported by wait()
            self._error = e

    def _write(self, step: int, header: bytes, data: torch.Tensor, progress: _Progress) -> None:
        with self._lock:
            for p in self.dir.iterdir():  # leftovers of crashed saves (incomplete: never a checkpoint)
                if _TMP.match(p.name):
                    shutil.rmtree(p, ignore_errors=True)
            tmp = self.dir / f"step_{step:09d}.tmp-{os.getpid()}"
            tmp.mkdir()
            algo = _hasher()
            files = {SKELETON: _write_file(tmp / SKELETON, header, algo)}  # while the tensors are copied
            _stream_file(tmp / DATA, _memview(data), progress, direct=True)
            files[DATA] = {"size": data.numel(), "blocks": progress.blocks}
            manifest = {"format": FORMAT, "step": step, "hash": algo, "block": BLOCK, "files": files}
            _write_file(tmp / MANIFEST, json.dumps(manifest).encode(), algo)
            _fsync_dir(tmp)
            final = self._path(step)
            if final.exists():
                _remove(final)  # renamed away first: a crash now leaves the new one in .tmp, the old in .trash
            os.rename(tmp, final)  # the completion marker
            _fsync_dir(self.dir)
            self._earlier.discard(step)
            self._newest = step if self._newest is None else max(self._newest, step)
            self._retain(step)

    def _retain(self, newest: int) -> None:
        steps = self.steps()
        keep = set(steps[-self.keep_last :]) | {newest}
        if self.keep_every:
            keep |= {s for s in steps if s % self.keep_every == 0}
        for s in steps:
            if s not in keep:
                _remove(self._path(s))
                self._earlier.discard(s)

    def check_recording(self, step: int) -> None:
        """Called when the training loop records a point at ``step``: refuse to mix this run's checkpoints with an
        earlier run's that were never restored (they would be silently replaced or, worse, restored by mistake)."""
        if self._earlier and not self._resumed:
            raise RewindError(
                f"DiskCheckpoints: {self.dir} holds checkpoints of an earlier run (steps {_brief(sorted(self._earlier))}"
                f"), but this run started recording at step {step} without restoring one. Resume first with "
                f"rw.rollback_to(ck.latest) (newest: step {max(self._earlier)}), or build DiskCheckpoints with "
                "overwrite=True to start afresh."
            )

    def discard_after(self, step: int) -> None:
        """Delete checkpoints newer than ``step`` (a branch that was undone and replaced)."""
        self.check_recording(step)
        if self._pending is not None and self._pending > step:
            self.wait()  # a save of the discarded branch is in flight: let it finish, then delete it
        if self._newest is None or self._newest <= step:
            return  # the common case, once per recorded step: no directory listing, no waiting for a save
        with self._lock:
            for s in self.steps():
                if s > step:
                    _remove(self._path(s))
                    self._earlier.discard(s)
            self._newest = max(self.steps(), default=None)

    # ------------------------------------------------------------------ reading
    def load(self, step: int, *, reuse_buffer: bool = False) -> Any:
        """The tree saved at ``step`` (tensors on the CPU). Every block is verified against its checksum first.

        ``reuse_buffer``: the tensors are views of the staging buffer, valid until the next save (no allocation;
        for a caller that copies them into place at once, as :meth:`Rewind.rollback_to` does)."""
        return self.read(step, reuse_buffer=reuse_buffer).tree

    def read(self, step: int, *, reuse_buffer: bool = False) -> Checkpoint:
        """Like :meth:`load`, with what a restore in place needs: the verified bytes and where the arena images are
        (see :func:`restore_plan`)."""
        self.wait()
        if step not in self.steps():
            raise RewindError(f"DiskCheckpoints: no complete checkpoint for step {step}; available: {self.steps()}.")
        path = self._path(step)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            fmt, algo, files = manifest.get("format"), manifest.get("hash"), manifest["files"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise RewindError(f"DiskCheckpoints: {path}/{MANIFEST} is unreadable ({e}); not loading it.") from None
        if fmt != FORMAT:
            raise RewindError(
                f"DiskCheckpoints: {path} was written in checkpoint format {fmt or 1} (an older torchrewind); this "
                f"version reads format {FORMAT}. Load it with the torchrewind that wrote it."
            )
        block = manifest.get("block")
        if (
            not isinstance(block, int) or block <= 0 or block % PAGE or block > 1 << 30
            or not all(isinstance(files.get(n), dict) for n in (DATA, SKELETON))
        ):  # fmt: skip
            raise RewindError(f"DiskCheckpoints: {path}/{MANIFEST} is malformed; not loading it.")
        size = files[SKELETON].get("size")
        if not isinstance(size, int) or not 0 < size < 1 << 31:
            raise RewindError(f"DiskCheckpoints: {path}/{MANIFEST} is malformed; not loading it.")
        header = bytearray(size)
        _read_file(path / SKELETON, memoryview(header), files[SKELETON], algo, 1, block=block)
        try:
            head = json.loads(header)
            table, total, skel = head["tensors"], head["data_bytes"], head["tree"]
            specs = [(_dtype(d), tuple(int(x) for x in shape), int(off), int(n)) for d, shape, off, n in table]
            images = [(int(base), int(n)) for base, n in head.get("arenas", [])]  # absent before torchrewind 0.2
        except (ValueError, KeyError, TypeError) as e:
            raise RewindError(f"DiskCheckpoints: {path}/{SKELETON} is malformed ({e}); not loading it.") from None
        if head.get("format") != FORMAT or not isinstance(total, int) or total < 0:
            raise RewindError(f"DiskCheckpoints: {path}/{SKELETON} is malformed; not loading it.")
        for dt, shape, off, n in specs:
            if off < 0 or off % ALIGN or off + n > total or n != math.prod(shape) * dt.itemsize:
                raise RewindError(f"DiskCheckpoints: {path}/{SKELETON} has a tensor out of range; not loading it.")
        end = 0
        for base, n in images:
            if base < end or base % PAGE or n <= 0 or base + n > total:
                raise RewindError(f"DiskCheckpoints: {path}/{SKELETON} has an arena out of range; not loading it.")
            end = base + n
        size = files[DATA].get("size")
        if size != -(-total // PAGE) * PAGE:
            raise RewindError(f"DiskCheckpoints: {path}/{DATA} does not match its manifest; not loading it.")
        buf = self._buffer(size) if reuse_buffer else _aligned(size)
        _read_file(path / DATA, _memview(buf[:size]), files[DATA], algo, self.threads, direct=True, block=block)
        tensors = [buf[off : off + n].view(dt).view(shape) if n else torch.empty(shape, dtype=dt)
                   for dt, shape, off, n in specs]  # fmt: skip
        try:
            tree = _join(skel, tensors)
        except (IndexError, KeyError, TypeError, ValueError) as e:
            raise RewindError(f"DiskCheckpoints: {path}/{SKELETON} is malformed ({e}); not loading it.") from None
        return Checkpoint(step, tree, skel, specs, tensors, images, buf[:size])

    def loaded(self, step: int) -> None:
        """Called after the state of ``step`` was restored from this directory: from here on this run owns it (an
        earlier run's later checkpoints are replaced as the new branch records, like an undone branch)."""
        self._resumed = True


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint in memory: its tree (tensors are views of ``data``), the skeleton and tensor table it
    was built from, and where its arena images are in ``data``."""

    step: int
    tree: Any
    skeleton: Any
    specs: list[tuple[torch.dtype, tuple[int, ...], int, int]]
    tensors: list[torch.Tensor]  # the tree's tensors in skeleton order
    images: list[tuple[int, int]]  # (offset, nbytes) of each arena image
    data: torch.Tensor


def restore_plan(
    ck: Checkpoint, live: Any, arenas: Sequence[torch.Tensor]
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], Any] | None:
    """How to restore ``ck`` into the live state whose tree is ``live`` and whose arenas' used bytes are ``arenas``
    by copying each arena image whole: ``(copies, tree)``, where ``copies`` are ``(arena bytes, image bytes)`` pairs
    and ``tree`` is ``ck.tree`` with every tensor of an image replaced by the live tensor it was saved from (loading
    a tensor into itself is free: ``copy_`` of an alias returns at once). None when the layouts differ (another
    model, or a fresh process whose optimizer state does not exist yet): then load the tree tensor by tensor.

    The layouts match when the live tree has the same structure, the arenas the same sizes, and every tensor of an
    image sits at the same place in the live arena: arena positions never move within a run, so the images are
    then what a device-ring restore would copy."""
    tensors: list[torch.Tensor] = []
    try:
        skel = _split(live, tensors, "live")
    except RewindValueError:
        return None
    table, _, images = _layout(tensors, arenas)
    if _structure(skel) != _structure(ck.skeleton) or [(b, n) for _, b, n in images] != ck.images:
        return None
    end = ck.images[-1][0] + ck.images[-1][1] if ck.images else 0
    merged = []
    for i, (dt, shape, off, n) in enumerate(ck.specs):
        if off < end and n:
            name, lshape, loff, _ = table[i]
            if loff != off or name != str(dt).removeprefix("torch.") or tuple(lshape) != shape:
                return None
            merged.append(tensors[i])
        else:
            merged.append(ck.tensors[i])
    copies = [(w.view(torch.uint8), ck.data[b : b + n]) for w, b, n in images]
    return copies, _join(ck.skeleton, merged)


def copy_images(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Carry out :func:`restore_plan`'s copies (arena <- image), emptying the list: no view of an arena may outlive
    the restore, since the arena's use count is how the tracker notices changes."""
    with torch.no_grad():
        while copies:
            dst, src = copies.pop()
            _copy(dst, src, dst.device.type == "cuda")
            del dst, src


def _structure(skel: Any) -> Any:
    """The skeleton without its Python values: containers, keys and where the tensors are."""
    if isinstance(skel, list):
        return [_structure(v) for v in skel]
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return skel
        if "__tuple__" in skel:
            return ("tuple", [_structure(v) for v in skel["__tuple__"]])
        if "__dict__" in skel:
            return ("dict", [(k, _structure(v)) for k, v in skel["__dict__"]])
    return None


def _aligned(nbytes: int, pin: bool = False) -> torch.Tensor:
    """A page-aligned host buffer of ``nbytes`` bytes (pinned for CUDA state: faster device-to-host copies)."""
    pin = pin and torch.cuda.is_available()
    base = torch.empty(nbytes + PAGE, dtype=torch.uint8, pin_memory=pin)
    off = (-base.data_ptr()) % PAGE
    return base[off : off + nbytes]  # the view keeps the allocation alive


def _brief(steps: list[int]) -> str:
    return str(steps) if len(steps) <= 6 else f"[{steps[0]}, {steps[1]}, ..., {steps[-1]}] ({len(steps)} in all)"
