"""The disk tier: periodic, atomic, checksummed checkpoints of the training state for long-horizon rollback.

A checkpoint is a *state tree* (nested dicts/lists/tuples of tensors and plain Python values, e.g.
``{"model": [sd], "optimizer": opt.state_dict(), ...}``) split in two:

* the tensors, written with ``torch.distributed.checkpoint`` (DCP: the same code writes per-rank shards under
  FSDP2; single-process here);
* the skeleton (structure, Python values, dict key types) as JSON.

Atomicity: everything is written into ``step_<n>.tmp-<pid>/``, with a ``manifest.json`` of SHA-256 sums and sizes,
fsynced, then renamed to ``step_<n>/`` — the rename is the completion marker, so a crash (even ``kill -9``) mid-save
leaves only a temp directory that is ignored and removed by the next save.

Safety: loading never unpickles arbitrary code. Every file is checked against the manifest first; DCP's
``.metadata`` is a pickle, so it is first parsed by a restricted unpickler that only admits DCP's own metadata
classes, dtypes and ``torch.Size`` — anything else is refused before DCP reads it; the skeleton is JSON.
Checksums detect corruption and torn writes; they are not signatures, so treat a checkpoint directory like code.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..distributed import local, rank_and_world
from ..errors import RewindError

_DIR = re.compile(r"^step_(\d+)$")
_TMP = re.compile(r"^step_(\d+)\.(tmp|trash)-\d+$")


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ the tree <-> JSON
def _split(tree: Any, tensors: dict[str, torch.Tensor], path: str, staging: dict[str, torch.Tensor]) -> Any:
    """JSON skeleton of ``tree``; tensors go to ``tensors`` as host copies (the staging of an async save), reusing
    the previous save's buffers in ``staging`` (fresh GB-sized allocations cost more than the copy itself)."""
    if isinstance(tree, torch.Tensor):
        tree = local(tree)  # FSDP2: this rank's shard (each rank writes its own checkpoint)
        if tree.layout != torch.strided:
            raise RewindError(f"DiskCheckpoints: {path} is a {tree.layout} tensor; only dense tensors can be saved.")
        key = f"t{len(tensors)}"
        buf = staging.get(key)
        if buf is None or buf.shape != tree.shape or buf.dtype != tree.dtype:
            buf = staging[key] = torch.empty(tree.shape, dtype=tree.dtype)
        buf.copy_(tree.detach())
        tensors[key] = buf
        return {"__tensor__": key}
    if tree is None or isinstance(tree, (bool, int, str)):
        return tree
    if isinstance(tree, float):
        return tree if math.isfinite(tree) else {"__float__": repr(tree)}
    if isinstance(tree, torch.dtype):
        return {"__dtype__": str(tree).removeprefix("torch.")}
    if isinstance(tree, (list, tuple)):
        items = [_split(v, tensors, f"{path}[{i}]", staging) for i, v in enumerate(tree)]
        return items if isinstance(tree, list) else {"__tuple__": items}
    if isinstance(tree, dict):
        out = []
        for k, v in tree.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise RewindError(f"DiskCheckpoints: {path} has a key {k!r}; only str and int keys can be saved.")
            out.append([k, _split(v, tensors, f"{path}[{k!r}]", staging)])
        return {"__dict__": out}
    raise RewindError(
        f"DiskCheckpoints: {path} is a {type(tree).__name__}, which cannot be saved safely (only tensors, numbers, "
        "strings, None and lists/tuples/dicts of them); keep it out of the state_dict."
    )


def _join(skel: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skel, list):
        return [_join(v, tensors) for v in skel]
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            return tensors[skel["__tensor__"]]
        if "__float__" in skel:
            return float(skel["__float__"])
        if "__dtype__" in skel:
            return getattr(torch, skel["__dtype__"])
        if "__tuple__" in skel:
            return tuple(_join(v, tensors) for v in skel["__tuple__"])
        return {k: _join(v, tensors) for k, v in skel["__dict__"]}
    return skel


# ------------------------------------------------------------------------------------------------ safe metadata
# Exactly the globals a DCP .metadata pickle contains. Names must match exactly: with protocol >= 4 pickle resolves
# dotted names attribute by attribute, so allowing "any name of module M" would admit "os.system" via M's imports.
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only what DCP's ``.metadata`` legitimately contains."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()) or (
            module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise RewindError(f"DiskCheckpoints: checkpoint metadata refers to {module}.{name}; refusing to load it.")


def _read_metadata(path: Path) -> Any:
    return _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()


# ------------------------------------------------------------------------------------------------ the tier
class DiskCheckpoints:
    """Every ``every``-th step's state on disk; keeps the last ``keep_last`` plus every ``keep_every``-th.

    A save copies the tensors into host staging buffers (kept and reused: one host copy of the state) and, with
    ``async_save``, writes them in a background thread while training goes on.

    Example::

        ck = DiskCheckpoints("ckpt/", every=50, keep_last=10)
        rw = Rewind(model, opt, tiers=Tiers(device=2, disk=ck))
        rw.rollback_to(rw.step - 100)      # loads the newest checkpoint at or before that step
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        every: int = 50,
        keep_last: int = 10,
        keep_every: int | None = None,
        async_save: bool = True,
    ) -> None:
        for name, v in (("every", every), ("keep_last", keep_last)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise RewindError(f"DiskCheckpoints: {name} must be an int >= 1, got {v!r}.")
        if keep_every is not None and (not isinstance(keep_every, int) or keep_every < 1):
            raise RewindError(f"DiskCheckpoints: keep_every must be an int >= 1 or None, got {keep_every!r}.")
        self.root = Path(directory)
        self.every, self.keep_last, self.keep_every = every, keep_last, keep_every
        self.async_save = async_save
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._staging: dict[str, torch.Tensor] = {}
        self._pending: int | None = None  # step of the save in flight
        self.dir = self.root
        self._newest: int | None = None
        self.bind_rank()

    def bind_rank(self) -> None:
        """Under torch.distributed with several ranks, each rank keeps its checkpoints in ``<directory>/rank<r>/``
        (its own shards under FSDP2, its replica under DDP: no cross-rank collision, works on node-local disks).
        Called at construction and again by :class:`~torchrewind.Rewind` (the process group may start later)."""
        if self._thread is not None:
            return  # a save is in flight: its directory stays
        rank, world = rank_and_world()
        self.dir = self.root / f"rank{rank}" if world > 1 else self.root
        self.dir.mkdir(parents=True, exist_ok=True)
        # newest complete step: lets discard_after, called at every recorded step, skip listing the directory
        self._newest = max(self.steps(), default=None)

    # ------------------------------------------------------------------ queries
    def due(self, step: int) -> bool:
        return step % self.every == 0

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending."""
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _DIR.match(p.name)) and p.is_dir())

    def latest_at_or_before(self, step: int) -> int | None:
        return max((s for s in self.steps() if s <= step), default=None)

    @property
    def nbytes(self) -> int:
        total = 0
        for s in self.steps():
            try:  # retention in a background save may delete a checkpoint while we look
                total += sum(f.stat().st_size for f in self._path(s).iterdir())
            except FileNotFoundError:
                pass
        return total

    def _path(self, step: int) -> Path:
        return self.dir / f"step_{step:09d}"

    # ------------------------------------------------------------------ writing
    def save(self, step: int, tree: Any) -> None:
        """Write ``tree`` as step ``step``. Tensors are copied to host memory before this returns (so training can
        go on); with ``async_save`` the files are written by a background thread (:meth:`wait` for it)."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise RewindError(f"DiskCheckpoints.save: step must be an int >= 0, got {step!r}.")
        self.wait()  # the previous save is complete: its staging buffers can be reused
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _split(tree, tensors, "tree", self._staging)  # validates everything before touching the disk
        if self.async_save:
            self._pending = step
            self._thread = threading.Thread(target=self._write_guarded, args=(step, skeleton, tensors), daemon=True)
            self._thread.start()
        else:
            self._write(step, skeleton, tensors)

    def wait(self) -> None:
        """Block until a pending save is complete; re-raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._pending = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RewindError(f"DiskCheckpoints: a background save failed: {err}") from err

    def _write_guarded(self, step: int, skeleton: Any, tensors: dict[str, torch.Tensor]) -> None:
        try:
            self._write(step, skeleton, tensors)
        except BaseException as e:  # reported by wait()
            self._error = e

    def _write(self, step: int, skeleton: Any, tensors: dict[str, torch.Tensor]) -> None:
        import torch.distributed.checkpoint as dcp

        with self._lock:
            for p in self.dir.iterdir():  # leftovers of crashed saves
                if _TMP.match(p.name):
                    shutil.rmtree(p, ignore_errors=True)
            tmp = self.dir / f"step_{step:09d}.tmp-{os.getpid()}"
            tmp.mkdir()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
                dcp.save({"tensors": tensors}, checkpoint_id=tmp, no_dist=True)
            (tmp / "skeleton.json").write_text(json.dumps(skeleton, allow_nan=False))
            files = sorted(p for p in tmp.iterdir())
            manifest = {"step": step, "files": {p.name: {"sha256": _sha256(p), "size": p.stat().st_size}
                                                for p in files}}  # fmt: skip
            (tmp / "manifest.json").write_text(json.dumps(manifest))
            for p in tmp.iterdir():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            _fsync_dir(tmp)
            final = self._path(step)
            if final.exists():
                _remove(final)  # renamed away first: a crash now leaves the new one in .tmp, the old in .trash
            os.rename(tmp, final)  # the completion marker
            _fsync_dir(self.dir)
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

    def discard_after(self, step: int) -> None:
        """Delete checkpoints newer than ``step`` (a branch that was undone and replaced)."""
        if self._pending is not None and self._pending > step:
            self.wait()  # a save of the discarded branch is in flight: let it finish, then delete it
        if self._newest is None or self._newest <= step:
            return  # the common case, once per recorded step: no directory listing, no waiting for a save
        with self._lock:
            for s in self.steps():
                if s > step:
                    _remove(self._path(s))
            self._newest = max(self.steps(), default=None)

    # ------------------------------------------------------------------ reading
    def load(self, step: int) -> Any:
        """The tree saved at ``step`` (tensors on the CPU). Verifies every file's checksum first."""
        self.wait()
        if step not in self.steps():
            raise RewindError(f"DiskCheckpoints: no complete checkpoint for step {step}; available: {self.steps()}.")
        path = self._path(step)
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except (OSError, ValueError) as e:
            raise RewindError(f"DiskCheckpoints: {path}/manifest.json is unreadable ({e}).") from None
        def check(name: str) -> None:
            f, info = path / name, manifest["files"][name]
            if not f.exists() or f.stat().st_size != info["size"] or _sha256(f) != info["sha256"]:
                raise RewindError(f"DiskCheckpoints: {f} is missing or corrupt (checksum mismatch); not loading it.")

        # The small files that steer the load (the pickled DCP metadata, the skeleton) are verified first; the
        # tensor data (read by DCP through torch.load(weights_only=True)) is hashed in a thread while it loads,
        # and nothing is returned before every checksum matched.
        data = [n for n in manifest["files"] if n not in (".metadata", "skeleton.json")]
        for name in (".metadata", "skeleton.json"):
            check(name)
        meta = _read_metadata(path / ".metadata")
        names = set(manifest["files"])
        for info in meta.storage_data.values():  # data files named by the metadata must be ones we wrote
            if getattr(info, "relative_path", None) not in names:
                raise RewindError(f"DiskCheckpoints: {path}/.metadata points outside the checkpoint; not loading it.")
        with ThreadPoolExecutor(max_workers=1) as pool:
            hashed = pool.submit(lambda: [check(n) for n in data])
            try:
                tree = self._read(path, meta)
            except Exception:
                hashed.result()  # a corrupt file explains the failure: say so
                raise
            hashed.result()
        return tree

    def _read(self, path: Path, meta: Any) -> Any:
        import torch.distributed.checkpoint as dcp

        class Reader(dcp.FileSystemReader):
            def read_metadata(self) -> Any:  # the metadata we already parsed safely: DCP would pickle.load it
                return meta

        tensors = {}
        for fqn, md in meta.state_dict_metadata.items():
            if not hasattr(md, "size") or not fqn.startswith("tensors."):
                raise RewindError(f"DiskCheckpoints: unexpected entry {fqn!r} in {path}/.metadata; not loading it.")
            tensors[fqn.split(".", 1)[1]] = torch.empty(tuple(md.size), dtype=md.properties.dtype)  # "tensors.t17"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load({"tensors": tensors}, storage_reader=Reader(path), no_dist=True)
        return _join(json.loads((path / "skeleton.json").read_text()), tensors)
