"""Shared helpers for the test-suite: bitwise state capture and comparison (never allclose)."""

from __future__ import annotations

import copy
from typing import Any

import torch

from torchrewind.distributed import local
from torchrewind.core.values import values_equal


def clone_value(v: Any) -> Any:
    """Deep copy with tensors cloned (bitwise), for recording a reference state. DTensors (FSDP2) become a clone of
    this rank's local shard."""
    if isinstance(v, torch.Tensor):
        return local(v).detach().clone()
    if isinstance(v, dict):
        return {k: clone_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(clone_value(x) for x in v)
    return copy.deepcopy(v)


def full_state(model: torch.nn.Module | None, optimizer: torch.optim.Optimizer, *extra: Any) -> dict:
    """Everything that must match bit for bit: params, buffers, optimizer state (tensors and Python values,
    keyed by parameter position), param_groups hyperparameters, extra objects' state_dicts, RNG."""
    params = list(model.parameters()) if model is not None else []
    index = {id(p): i for i, p in enumerate(params)}
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in index:
                index[id(p)] = len(index)
    out: dict[str, Any] = {}
    if model is not None:
        out["model"] = {k: clone_value(v) for k, v in model.state_dict(keep_vars=False).items()}
    out["opt_state"] = {
        index[id(p)]: {k: clone_value(v) for k, v in st.items()} for p, st in optimizer.state.items()
    }
    out["opt_state_order"] = [index[id(p)] for p in optimizer.state]
    out["groups"] = [
        {k: clone_value(v) if k != "params" else [index[id(p)] for p in v] for k, v in g.items()}
        for g in optimizer.param_groups
    ]
    out["extra"] = [clone_value(e.state_dict()) for e in extra]
    out["rng"] = torch.get_rng_state()
    return out


def diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two full_state() results differ (empty list: bitwise equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        if list(a.keys()) != list(b.keys()):
            out.append(f"{path}: keys {list(a.keys())} != {list(b.keys())}")
        for k in a:
            if k in b:
                out += diff(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and not isinstance(a, torch.Tensor):
        if len(a) != len(b) or type(a) is not type(b):
            return [f"{path}: {type(a).__name__}[{len(a)}] != {type(b).__name__}[{len(b)}]"]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += diff(x, y, f"{path}[{i}]")
        return out
    if not values_equal(a, b):
        return [f"{path}: {short(a)} != {short(b)}"]
    return []


def short(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor{list(v.shape)}:{v.dtype} sum={v.double().sum().item() if v.numel() else 0}"
    return repr(v)[:80]


def assert_same(a: dict, b: dict) -> None:
    d = diff(a, b)
    assert not d, "states differ:\n" + "\n".join(d[:20])
