"""The live training state as plain ``state_dict``s (what the disk tier writes) and back, loading in place.

Example::

    tree = state_tree(modules, optimizer, objects, scaler, rng)       # {"model": [...], "optimizer": ..., ...}
    check_tree(tree, modules, optimizer, objects)                    # raises before anything changes
    apply_tree(tree, modules, optimizer, objects, scaler, rng)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..core.rng import RNGState, rng_from_tree, rng_to_tree
from ..distributed import like, local
from ..errors import RewindError


def state_tree(
    modules: Sequence[torch.nn.Module], optimizer: torch.optim.Optimizer, objects: Sequence[Any], scaler: Any,
    rng: RNGState,
) -> dict[str, Any]:  # fmt: skip
    """The live state as plain state_dicts (tensors are the live ones: copy before the state changes)."""
    return {
        "model": [m.state_dict() for m in modules],
        "optimizer": optimizer.state_dict(),
        "objects": [o.state_dict() for o in objects],
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_to_tree(rng.capture()) if rng.active else {},
        "group_keys": [list(g) for g in optimizer.param_groups],
    }


def check_tree(
    tree: Any, modules: Sequence[torch.nn.Module], optimizer: torch.optim.Optimizer, objects: Sequence[Any]
) -> None:
    """Refuse a tree that does not fit the live state (another model, optimizer layout or set of objects), before
    anything is changed: ``load_state_dict`` would otherwise fail half-way through."""
    want = ("model", "optimizer", "objects", "scaler", "rng", "group_keys")
    if not isinstance(tree, dict) or any(k not in tree for k in want):
        raise RewindError("checkpoint: not a torchrewind state tree; not loading it.")
    if len(tree["model"]) != len(modules) or len(tree["objects"]) != len(objects):
        raise RewindError(
            f"checkpoint holds {len(tree['model'])} model(s) and {len(tree['objects'])} scheduler/object(s); this "
            f"Rewind has {len(modules)} and {len(objects)}. Build it with the same model and schedulers."
        )
    for i, (m, sd) in enumerate(zip(modules, tree["model"])):
        live = m.state_dict()
        if set(live) != set(sd):
            extra, missing = sorted(set(sd) - set(live))[:3], sorted(set(live) - set(sd))[:3]
            raise RewindError(f"checkpoint: model {i} differs (unexpected keys {extra}, missing {missing}).")
        for k, v in sd.items():
            lv = local(live[k]) if isinstance(live[k], torch.Tensor) else live[k]
            if isinstance(v, torch.Tensor) and (
                not isinstance(lv, torch.Tensor) or lv.shape != v.shape or lv.dtype != v.dtype
            ):
                got = f"{tuple(v.shape)} {v.dtype}"
                have = f"{tuple(lv.shape)} {lv.dtype}" if isinstance(lv, torch.Tensor) else type(lv).__name__
                raise RewindError(f"checkpoint: model {i} key {k!r} is {got}, the live one {have}.")
    osd = tree["optimizer"]
    if not isinstance(osd, dict) or len(osd.get("param_groups", ())) != len(optimizer.param_groups) or any(
        len(sg["params"]) != len(g["params"]) for sg, g in zip(osd["param_groups"], optimizer.param_groups)
    ):
        raise RewindError("checkpoint: the optimizer's parameter groups differ from the live optimizer's.")


def apply_tree(
    tree: dict[str, Any], modules: Sequence[torch.nn.Module], optimizer: torch.optim.Optimizer,
    objects: Sequence[Any], scaler: Any, rng: RNGState,
) -> None:  # fmt: skip
    """Load ``tree`` into the live objects (tensors copied in place where the layout allows). The tree's tensors
    may be reused afterwards: nothing keeps a reference to them."""
    for m, sd in zip(modules, tree["model"]):
        live = m.state_dict()  # FSDP2: DTensors; the checkpoint holds this rank's shards as plain tensors
        m.load_state_dict({k: like(live[k], v) if k in live else v for k, v in sd.items()})
    if not load_optimizer_in_place(optimizer, tree["optimizer"]):
        optimizer.load_state_dict(_cloned(tree["optimizer"]))  # it may keep the tensors it is given
    for g, saved in zip(optimizer.param_groups, tree["group_keys"]):
        order = [k for k in saved if k in g] + [k for k in g if k not in saved]
        if list(g) != order:  # load_state_dict moves "params" last: put the keys back in their recorded order
            items = [(k, g[k]) for k in order]
            g.clear()
            g.update(items)
    for o, sd in zip(objects, tree["objects"]):
        o.load_state_dict(_cloned(sd))
    if scaler is not None and tree["scaler"] is not None:
        scaler.load_state_dict(tree["scaler"])
    rng.restore(rng_from_tree(tree["rng"]))


def _cloned(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, dict):
        return {k: _cloned(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_cloned(x) for x in v)
    return v


def load_optimizer_in_place(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> bool:
    """Write a state_dict of this optimizer into its existing state tensors (they stay in the arena: no
    re-binding, no copies of the replaced ones). False, changing nothing, if the layout differs."""
    groups = opt.param_groups
    if len(groups) != len(sd["param_groups"]) or any(
        len(g["params"]) != len(sg["params"]) for g, sg in zip(groups, sd["param_groups"])
    ):
        return False
    by_id = {i: p for g, sg in zip(groups, sd["param_groups"]) for i, p in zip(sg["params"], g["params"])}
    want = {by_id[i]: st for i, st in sd["state"].items()}
    for p, saved in want.items():
        live = opt.state.get(p, {})
        for k, v in saved.items():
            t = live.get(k)
            t = local(t) if isinstance(t, torch.Tensor) else t  # FSDP2: compare with this rank's shard
            if isinstance(v, torch.Tensor) and not (
                isinstance(t, torch.Tensor) and t.shape == v.shape and t.dtype == v.dtype
            ):
                return False  # needs a new tensor (on the right device): load_state_dict's job
    with torch.no_grad():
        for p in [p for p in opt.state if p not in want]:
            del opt.state[p]
        for p, saved in want.items():
            live = opt.state[p]
            for k in [k for k in live if k not in saved]:
                del live[k]
            for k, v in saved.items():
                if isinstance(v, torch.Tensor):
                    local(live[k]).copy_(v)
                else:
                    live[k] = v
        for g, sg in zip(groups, sd["param_groups"]):
            for k in [k for k in g if k != "params" and k not in sg]:
                del g[k]
            for k, v in sg.items():
                if k == "params":
                    continue
                if isinstance(g.get(k), torch.Tensor) and isinstance(v, torch.Tensor):
                    g[k].copy_(v)
                else:
                    g[k] = _cloned(v)
    return True
