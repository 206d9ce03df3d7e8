"""The README's code runs as written: every ```python block is executed (or, for the API listing, checked against
the real signatures and attributes), on a small synthetic task, so a renamed argument or a changed default fails
here before a user copies it.

Blocks are found by what they start with, not by position, so reordering the README does not break this file; a
new block that no test claims fails ``test_every_block_is_checked``.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import torchrewind
from torchrewind import FaultTriage, LineSearch, NonFiniteGuard, Rewind, SpikeGuard

README = Path(__file__).resolve().parents[1] / "README.md"
DOCS = sorted((README.parent / "docs").glob("*.md"))


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


BLOCKS = python_blocks(README)

# first line of each block -> the test that runs it
CLAIMED = {
    "import torch": "test_quickstart_loop",
    "from torchrewind import Rewind, SpikeGuard": "test_policies_loop_and_resume",
    "torch.save(": "test_policies_loop_and_resume",
    "from torchrewind import FaultTriage": "test_triage_loop",
    "from torchrewind import lr_find": "test_tuners",
    "from torchrewind import DiskCheckpoints": "test_tiers",
    "ck = DiskCheckpoints(": "test_disk_resume",
    "from torchrewind.integrations.lightning import": "test_integration_imports",
    "Rewind(model, optimizer,": "test_api_listing",
}


def block(start: str) -> str:
    found = [b for b in BLOCKS if b.startswith(start)]
    assert len(found) == 1, f"README: expected one python block starting with {start!r}, found {len(found)}"
    return found[0]


def test_every_block_is_checked() -> None:
    unclaimed = [b.splitlines()[0] for b in BLOCKS if not any(b.startswith(s) for s in CLAIMED)]
    assert not unclaimed, f"README python blocks no test runs (add them to CLAIMED): {unclaimed}"


def namespace(n_batches: int = 6) -> dict:
    """What the README's fragments assume exists: a small classifier (the quick start's), its optimizer and
    scheduler, and batches of a synthetic 10-class problem with 64 features (digits-sized)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n_batches * 32, 64, generator=gen)
    y = (x[:, :10].argmax(1) + (torch.rand(len(x), generator=gen) < 0.1).long()) % 10
    loader = [(x[i : i + 32], y[i : i + 32]) for i in range(0, len(x), 32)]
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.9)
    return {"torch": torch, "F": F, "model": model, "opt": opt, "sched": sched, "loader": loader, "batches": loader,
            "train_set": torch.utils.data.TensorDataset(x, y)}


def run(code: str, ns: dict, name: str) -> dict:
    exec(compile(code, f"README.md:{name}", "exec"), ns)  # noqa: S102 - the point of this file
    return ns


def params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_quickstart_loop() -> None:
    ns = namespace()
    before = params(ns["model"])
    ns = run(block("import torch"), ns, "quickstart")
    rw = ns["rw"]
    assert isinstance(rw, Rewind) and rw.capacity == 4
    assert rw.step > 0  # the loop stepped: the retry path and the plain path both leave steps behind
    assert any(not torch.equal(a, b) for a, b in zip(before, ns["model"].parameters()))


def test_policies_loop_and_resume(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    ns = run(block("from torchrewind import Rewind, SpikeGuard"), namespace(), "policies")
    guard, ls = ns["guard"], ns["ls"]
    assert isinstance(guard, SpikeGuard) and isinstance(ls, LineSearch)
    assert ls.iteration == len(ns["loader"])
    sd = guard.state_dict()
    ns = run(block("torch.save("), ns, "resume")
    assert (tmp_path / "ckpt.pt").exists()
    assert guard.state_dict().keys() == sd.keys()


def test_triage_loop(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    ns = namespace()
    before = params(ns["model"])
    ns = run(block("from torchrewind import FaultTriage"), ns, "triage")
    assert isinstance(ns["triage"], FaultTriage)
    assert any(not torch.equal(a, b) for a, b in zip(before, ns["model"].parameters()))  # healthy steps taken


def test_tuners(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    pytest.importorskip("matplotlib")
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    ns = namespace(n_batches=8)
    ns["batch_iter"] = itertools.cycle(ns["loader"])
    ns = run(block("from torchrewind import lr_find"), ns, "tuners")
    res = ns["res"]
    assert res.suggestion > 0 and (tmp_path / "lr.png").exists()
    assert isinstance(ns["bs"], int) and 1 <= ns["bs"] <= len(ns["train_set"])
    # the last two lines import the framework versions under the same name
    assert ns["lr_find"] is not torchrewind.lr_find


def train(ns: dict, rw: Rewind, steps: int) -> None:
    model, opt, sched, loader = ns["model"], ns["opt"], ns["sched"], ns["loader"]
    for _, (x, y) in zip(range(steps), itertools.cycle(loader)):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_tiers(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code = block("from torchrewind import DiskCheckpoints")
    assert "\n...\n" in code  # the README's "train for a while": done here for 130 steps
    code = code.replace("\n...\n", "\ntrain(globals(), rw, 130)\n")
    ns = namespace()
    ns["train"] = train
    ns = run(code, ns, "tiers")
    rw = ns["rw"]
    try:
        assert ns["got"] <= 130 - 100 and rw.step == ns["got"]
        assert set(rw.nbytes_by_tier) == {"device", "host", "disk"}
    finally:
        rw.close()


def test_disk_resume(tmp_path, monkeypatch) -> None:
    """Run the block twice: a fresh directory starts at 0; after the first run, the second resumes from its newest
    checkpoint."""
    monkeypatch.chdir(tmp_path)
    code = block("ck = DiskCheckpoints(").replace("    ...\n", "    train(globals(), rw, 1)\n")
    ns = namespace()
    ns.update(train=train, total_steps=120, DiskCheckpoints=torchrewind.DiskCheckpoints, Tiers=torchrewind.Tiers,
              Rewind=Rewind)  # fmt: skip
    ns = run(code, ns, "disk-resume")
    assert ns["start"] == 0
    ns["rw"].close()
    ns2 = namespace()
    ns2.update({k: ns[k] for k in ("train", "total_steps", "DiskCheckpoints", "Tiers", "Rewind")})
    ns2 = run(code, ns2, "disk-resume-again")
    try:
        assert ns2["start"] == ns["ck"].latest == 100
        assert ns2["rw"].step == ns2["total_steps"]
    finally:
        ns2["rw"].close()


def test_integration_imports() -> None:
    """The integration block builds a Lightning Trainer and an HF Trainer from user objects; here its imports and
    the callbacks' constructors run as written (full runs: tests/test_lightning.py, tests/test_hf.py)."""
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    code = block("from torchrewind.integrations.lightning import")
    tree = ast.parse(code)
    ns: dict = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            run(ast.unparse(node), ns, "integrations")
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "").endswith("Callback")]
    assert len(calls) == 2  # RewindCallback(...), RewindTrainerCallback(...)
    for call in calls:
        cb = eval(compile(ast.Expression(call), "README.md:integrations", "eval"), ns)  # noqa: S307
        assert type(cb).__name__ == call.func.id


def check_listing(listing: str, func: object) -> None:
    """A signature as a doc lists it (``name(a, b=1, *, c=None) -> R``) is ``func``'s: the same names in the same
    order, the same keyword-only marker, the same defaults."""
    listing = listing.split(" -> ")[0].strip()
    fn = ast.parse(f"def {listing}: pass").body[0].args  # written as a def so "*" parses
    defaults = dict(zip([a.arg for a in fn.args][len(fn.args) - len(fn.defaults) :], fn.defaults))
    defaults.update({a.arg: d for a, d in zip(fn.kwonlyargs, fn.kw_defaults) if d is not None})
    real = inspect.signature(func).parameters.values()
    name = getattr(func, "__name__", func)
    assert [a.arg for a in fn.args] == [p.name for p in real if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD], name
    assert [a.arg for a in fn.kwonlyargs] == [p.name for p in real if p.kind is inspect.Parameter.KEYWORD_ONLY], name
    for p in real:
        if p.default is not inspect.Parameter.empty:
            got = ast.literal_eval(defaults[p.name]) if p.name in defaults else "<no default>"
            assert got == p.default, f"{name}: the docs list {p.name}={got!r}, the default is {p.default!r}"


def check_defaults(args: str, func: object, where: str) -> int:
    """Every ``name=default`` in a listed call's argument text is ``func``'s default for ``name``; returns how many
    were checked."""
    params = inspect.signature(func).parameters
    pairs = re.findall(r"(\w+)=([^,]+)", args)
    for name, default in pairs:
        assert params[name].default == ast.literal_eval(default.strip()), f"README: {where}({name}={default})"
    return len(pairs)



@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_docs_blocks_parse(path: Path) -> None:
    """Every python block of docs/ is valid Python, or a signature listing that matches the real signature."""
    for code in python_blocks(path):
        try:
            ast.parse(code)
        except SyntaxError:
            name = code.split("(", 1)[0]
            assert hasattr(torchrewind, name), f"{path.name}: a block that is not Python nor a listing:\n{code}"
            check_listing(code, getattr(torchrewind, name))


def test_api_listing() -> None:
    """The API block: the Rewind signature as listed is the real one (names, order, defaults, keyword-only
    marker), and every method or attribute it names exists."""
    code = block("Rewind(model, optimizer,")
    check_listing(code[: code.index("\nrw.")], Rewind)

    ns = namespace()
    rw = Rewind(ns["model"], ns["opt"])  # attributes set in __init__ exist on instances only
    objs = {"rw": [rw], "guard": [SpikeGuard(rw), NonFiniteGuard(Rewind(ns["model"], ns["opt"]))],
            "triage": [FaultTriage(rw)]}  # fmt: skip
    named = re.findall(r"(?<![\w/])(rw|guard|triage)\.(\w+)", code)  # not docs/triage.md
    assert len(named) > 30
    for owner, attr in named:
        for obj in objs[owner]:
            assert hasattr(obj, attr), f"README names {owner}.{attr}; {type(obj).__name__} has no such attribute"
    # the defaults of the methods it lists with them: rw.undo(n=1), guard.step(loss, closure=None), ...
    calls = re.findall(r"(?<![\w/])(rw|guard|triage)\.(\w+)\(([^()]*)\)", code)
    checked = sum(check_defaults(args, getattr(obj, method), f"{owner}.{method}")
                  for owner, method, args in calls for obj in objs[owner])  # fmt: skip
    assert checked >= 6
    assert check_defaults(code.split("triage = FaultTriage(", 1)[1].split(")", 1)[0], FaultTriage, "FaultTriage") == 5
