"""RewindCallback (PyTorch Lightning): the same decisions and the same state, bit for bit, as a plain PyTorch loop
that runs ``if guard.step(loss): sched.step()`` on the same batches; and clear errors that leave training untouched."""

import math
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lightning")
import lightning.pytorch as L  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from torchrewind import NonFiniteGuard, Rewind, RewindError, SpikeDetector, SpikeGuard  # noqa: E402
from torchrewind.core.values import values_equal  # noqa: E402
from torchrewind.integrations.lightning import RewindCallback  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # num_workers, batch-size inference, ...
warnings.filterwarnings("ignore", ".*does not have many workers.*")

D_IN, N_CLS, BS = 16, 4, 32


def make_batches(n, spike=(), nan=(), seed=0):
    """Synthetic classification batches; ``spike``: inputs x1000 (a loss spike), ``nan``: one NaN input."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(D_IN, N_CLS, generator=g)
    out = []
    for i in range(n):
        x = torch.randn(BS, D_IN, generator=g)
        y = (x @ w).argmax(1)
        if i in spike:
            x = x * 1000.0
        if i in nan:
            x = x.clone()
            x[0, 0] = float("nan")
        out.append((x, y))
    return out


def mlp(dropout=False, bn=False):
    torch.manual_seed(0)
    mid = ([torch.nn.Dropout(0.25)] if dropout else []) + ([torch.nn.BatchNorm1d(32)] if bn else [])
    return torch.nn.Sequential(torch.nn.Linear(D_IN, 32), torch.nn.ReLU(), *mid, torch.nn.Linear(32, N_CLS))


def make_opt(params, kind):
    if kind == "adam":
        return torch.optim.Adam(params, lr=0.01)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def make_scheds(opt, spec):
    """[(scheduler, interval)]: StepLR per step, and with "step+epoch" an ExponentialLR per epoch."""
    out = []
    if spec in ("step", "step+epoch"):
        out.append((torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5), "step"))
    if spec == "step+epoch":
        out.append((torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9), "epoch"))
    return out


def spike_kwargs():
    return dict(detector=SpikeDetector(window=12, warmup=6), rollback=2, skip_batches=1, cooldown=3, ramp=3)


class Net(L.LightningModule):
    def __init__(self, opt="adam", sched=None, n_opt=1, manual=False, dropout=False, bn=False):
        super().__init__()
        self.net = mlp(dropout, bn)
        self.opt_kind, self.sched_spec, self.n_opt = opt, sched, n_opt
        self.automatic_optimization = not manual
        self.opt = self.scheds = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        opts = [make_opt(self.net.parameters(), self.opt_kind) for _ in range(self.n_opt)]
        self.opt = opts[0]
        self.scheds = make_scheds(self.opt, self.sched_spec)
        if self.n_opt > 1:
            return opts
        if not self.scheds:
            return self.opt
        return [self.opt], [{"scheduler": s, "interval": iv} for s, iv in self.scheds]


class Probe(L.Callback):
    """Put after RewindCallback: sees the state each batch ends with, after the guard's decision."""

    def __init__(self):
        self.params, self.last_epochs = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params.append([p.detach().clone() for p in pl_module.parameters()])
        self.last_epochs.append([s.last_epoch for s, _ in pl_module.scheds or []])


def fit(module, batches, callbacks, epochs=1, accumulate=1, **trainer_kwargs):
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, max_epochs=epochs, accumulate_grad_batches=accumulate, num_sanity_val_steps=0,
        callbacks=callbacks, **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(module, DataLoader(batches, batch_size=None))  # each item is already a batch
    return trainer


def plain(batches, make_guard, opt_kind, sched_spec=None, epochs=1, accumulate=1, dropout=False):
    """The hand-written loop Lightning should equal: same init, same batches, zero_grad/backward/step semantics.
    With dropout, the same RNG stream: the DataLoader's iterator draws its seed at each epoch's start, and each step's
    undo point is taken before its forward passes (rw.snapshot(), as the callback does at on_train_batch_start).
    One documented difference: in Lightning the step runs before the decision, so a step that is not applied is
    undone to that point, forward passes included (their RNG draws, BatchNorm statistics); guard.step(loss) skips
    without undoing anything, so here the RNG is put back by hand after a skip."""
    net = mlp(dropout)
    opt = make_opt(net.parameters(), opt_kind)
    scheds = make_scheds(opt, sched_spec)
    rw = Rewind(net, opt, schedulers=[s for s, _ in scheds], capacity=2)
    guard = make_guard(rw)
    for _ in range(epochs):
        iter(DataLoader(batches, batch_size=None))  # consumes the RNG as Lightning's epoch start does
        for k in range(0, len(batches), accumulate):
            if dropout:
                rw.snapshot()
                rng = torch.get_rng_state()
            opt.zero_grad()
            total = None
            for x, y in batches[k : k + accumulate]:
                loss = F.cross_entropy(net(x), y) / accumulate  # Lightning divides by accumulate_grad_batches
                loss.backward()
                total = loss.detach() if total is None else total + loss.detach()
            if guard.step(total):
                for s, iv in scheds:
                    if iv == "step":
                        s.step()
            elif dropout and (guard.log[-1].kind == "skipped" or guard.log[-1].undone == 0):
                torch.set_rng_state(rng)  # a skip, or a spike's batch dropped with nothing undone
        for s, iv in scheds:
            if iv == "epoch":
                s.step()
    return net, opt, [s for s, _ in scheds], guard


def assert_same(a, b, where="state"):
    """Bitwise equality of nested state (tensors with torch.equal, floats exactly)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training(module, ref_net, ref_opt, ref_scheds):
    assert_same(list(module.net.parameters()), list(ref_net.parameters()), "params")
    assert_same(module.opt.state_dict(), ref_opt.state_dict(), "optimizer")
    assert_same([s.state_dict() for s, _ in module.scheds], [s.state_dict() for s in ref_scheds], "schedulers")


def assert_same_log(cb_log, ref_log):
    assert [e.kind for e in cb_log] == [e.kind for e in ref_log]
    for a, b in zip(cb_log, ref_log):
        assert (a.iteration, a.step, a.reason, a.lrs, a.skipped_batches) == (b.iteration, b.step, b.reason, b.lrs,
                                                                            b.skipped_batches)  # fmt: skip
        assert_same(a.loss, b.loss, "loss")
        # in Lightning the step was already taken: a decision not to apply it also undid it
        assert a.undone == b.undone + (a.kind != "accepted")


CASES = {
    # guard, optimizer, scheduler, epochs, accumulate_grad_batches, spike batches, NaN batches, batches
    "spike-adam": ("spike", "adam", None, 1, 1, (12,), (20,), 28),
    "nonfinite-sgd": ("nonfinite", "sgd", None, 1, 1, (), (5, 6, 15), 20),
    "spike-sgd-schedulers-2-epochs": ("spike", "sgd", "step+epoch", 2, 1, (11,), (19,), 20),
    "spike-adam-accumulate-2": ("spike", "adam", "step", 1, 2, (25,), (40,), 48),
    "spike-adam-dropout-accumulate-2": ("spike", "adam", None, 1, 2, (25,), (41,), 48),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_decisions_and_state_as_plain_loop(case):
    """A Lightning run with injected loss spikes and NaN batches ends with exactly the parameters, optimizer state
    and LR schedulers of a plain loop using guard.step(loss), after the same decisions (kinds, losses, lrs)."""
    kind, opt, sched, epochs, acc, spike, nan, n = CASES[case]
    dropout = "dropout" in case  # the RNG draws of the undone forward passes are undone too
    batches = make_batches(n, spike=spike, nan=nan)
    if kind == "spike":
        cb = RewindCallback("spike", **spike_kwargs())
        ref = plain(batches, lambda rw: SpikeGuard(rw, **spike_kwargs()), opt, sched, epochs, acc, dropout)
    else:
        cb = RewindCallback("nonfinite", max_consecutive=5)
        ref = plain(batches, lambda rw: NonFiniteGuard(rw, max_consecutive=5), opt, sched, epochs, acc, dropout)
    module = Net(opt, sched, dropout=dropout)
    trainer = fit(module, batches, [cb], epochs=epochs, accumulate=acc)
    ref_guard = ref[3]
    kinds = [e.kind for e in ref_guard.log]
    assert "skipped" in kinds and ("rolled_back" in kinds or kind == "nonfinite")
    assert len(cb.log) == epochs * n // acc == trainer.global_step  # undone steps count in global_step
    assert_same_log(cb.log, ref_guard.log)
    assert_same_training(module, *ref[:3])
    assert all(p.isfinite().all() for p in module.parameters())
    m = trainer.callback_metrics  # counters logged with pl_module.log
    assert m["rewind/skipped"] == kinds.count("skipped") and m["rewind/rolled_back"] == kinds.count("rolled_back")


def test_nan_batch_step_undone_and_training_continues():
    batches = make_batches(16, nan=(7,))
    probe = Probe()
    cb = RewindCallback("nonfinite")
    module = Net("adam", bn=True)
    trainer = fit(module, batches, [cb, probe])
    assert trainer.global_step == 16 and len(cb.log) == 16
    e = cb.log[7]
    assert (e.kind, e.undone) == ("skipped", 1) and "non-finite" in e.reason and math.isnan(e.loss)
    assert_same(probe.params[7], probe.params[6], "params after the NaN batch")  # its step was undone
    assert not torch.equal(probe.params[8][0], probe.params[7][0])  # and training went on
    assert [x.kind for x in cb.log].count("accepted") == 15 and cb.last_step_stood is True
    assert all(p.isfinite().all() for p in module.parameters())
    # the undo point is before training_step: the NaN batch's BatchNorm statistics were undone too
    assert all(b.float().isfinite().all() for b in module.buffers())
    assert cb.rewind.step == 15  # the Rewind counts the steps that stand


def test_lr_scheduler_is_rolled_back_with_the_steps():
    """StepLR (interval="step") and ExponentialLR (interval="epoch"): a roll-back undoes the StepLR steps of the
    undone optimizer steps (Lightning stepped it before on_train_batch_end); a rejected last batch of an epoch keeps
    the epoch scheduler's step."""
    n = 20
    batches = make_batches(n, spike=(11,), nan=(n - 1,))  # spike in each epoch, NaN on each epoch's last batch
    probe = Probe()
    cb = RewindCallback("spike", **spike_kwargs(), drop_first=False)  # every spike rolls back
    module = Net("sgd", "step+epoch")
    fit(module, batches, [cb, probe], epochs=2)
    step_sched, epoch_sched = (s for s, _ in module.scheds)
    ev = {e.iteration: e for e in cb.log}
    assert ev[11].kind == "rolled_back" and ev[11].undone == 3  # its own step + rollback=2
    steps = [le[0] for le in probe.last_epochs]
    assert steps[11] == steps[10] - 2  # StepLR went back with the two undone steps
    assert ev[n - 1].kind == "skipped" and probe.last_epochs[n - 1][1] == 1  # the epoch's ExponentialLR step stays
    assert step_sched.last_epoch == cb.guard.steps  # the step schedule advanced only with the steps that stand
    assert epoch_sched.last_epoch == 2
    lr = 0.05 * 0.5 ** (step_sched.last_epoch // 4) * 0.9**2
    assert module.opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)  # closed form, for the reader


def test_grad_scaler_skipped_step_is_logged_and_spike_rolls_back():
    """16-mixed with a GradScaler (on CPU only with an explicit plugin): the closure runs outside optimizer.step and
    the scaler skips the NaN batch's step itself; the scaler is part of the undone state."""
    from lightning.pytorch.plugins import MixedPrecision

    # init_scale=1: the x1000 batch's scaled gradients stay finite, so it is the guard (not the scaler) that acts
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1000))
    batches = make_batches(24, spike=(12,), nan=(18,))
    cb = RewindCallback("spike", **spike_kwargs())
    module = Net("adam")
    fit(module, batches, [cb], plugins=[plugin])
    ev = {e.iteration: e for e in cb.log}
    assert ev[12].kind == "rolled_back"
    assert ev[18].kind == "skipped" and "not called" in ev[18].reason and ev[18].undone == 0
    assert plugin.scaler.get_scale() == 0.5  # the scaler's back-off after the NaN batch stands (nothing undone)
    assert all(p.isfinite().all() for p in module.parameters())
    plugin.scaler.update(123.0)  # the scaler is part of the recorded state: an undo brings its scale back
    cb.rewind.undo()
    assert plugin.scaler.get_scale() == 0.5


def test_guard_none_records_every_step_for_undo():
    batches = make_batches(6)
    probe = Probe()
    cb = RewindCallback(None, capacity=3)
    module = Net("adam")
    fit(module, batches, [cb, probe])
    assert cb.guard is None and len(cb.log) == 0 and len(cb.rewind) == 3
    cb.rewind.undo(2)  # still possible after fit (the hooks are gone, the history is not)
    assert_same(list(module.parameters()), probe.params[3], "params after undo(2)")


def test_guard_factory():
    batches = make_batches(8, nan=(3,))
    cb = RewindCallback(lambda rw: SpikeGuard(rw, rollback=1), capacity=2)
    fit(Net("adam"), batches, [cb])
    assert isinstance(cb.guard, SpikeGuard) and cb.log is cb.guard.log and cb.log[3].kind == "skipped"


# -- errors: clear, and the training state untouched ---------------------------------------------------------------
def initial_params(module):
    return [p.detach().clone() for p in module.parameters()]


def test_manual_optimization_is_refused_before_anything_runs():
    module = Net("adam", manual=True)
    before = initial_params(module)
    with pytest.raises(RewindError, match="automatic optimization only.*Rewind"):
        fit(module, make_batches(4), [RewindCallback("spike")])
    assert_same(list(module.parameters()), before)
    assert module.opt is None  # configure_optimizers never ran


def test_two_optimizers_are_refused():
    module = Net("adam", n_opt=2, manual=True)  # several optimizers need manual optimization in Lightning 2.x
    before = initial_params(module)
    with pytest.raises(RewindError, match="automatic optimization only"):
        fit(module, make_batches(4), [RewindCallback("nonfinite")])
    assert_same(list(module.parameters()), before)

    class AddOptimizer(L.Callback):  # a setup that ends with two optimizers (Lightning refuses it otherwise)
        def on_train_start(self, trainer, pl_module):
            trainer.strategy.optimizers = [*trainer.optimizers, make_opt(pl_module.parameters(), "sgd")]

    module = Net("adam")
    before = initial_params(module)
    with pytest.raises(RewindError, match="exactly one optimizer, the Trainer has 2"):
        fit(module, make_batches(4), [AddOptimizer(), RewindCallback("nonfinite")])
    assert_same(list(module.parameters()), before)
    assert not module.opt.state  # no step was taken


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (("spiky",), {}, "guard must be one of"),
        ((), {"capacity": 0}, "capacity must be an int >= 1"),
        (("spike", 2), {"rollback": 2}, "capacity=2 is too small for rollback=2"),
        (("spike", 1), {}, "rollback must be an int >= 1"),
        (("spike",), {"lr_factr": 0.5}, r"no option\(s\) \['lr_factr'\]"),
        (("spike",), {"lr_factor": 2.0}, "lr_factor must be a finite number in"),
        (("nonfinite",), {"max_consecutive": 0}, "max_consecutive must be an int >= 1"),
        ((None,), {"skip_batches": 2}, "need guard='spike' or 'nonfinite'"),
        (("spike",), {"rewind_kwargs": {"capacity": 4}}, "rewind_kwargs cannot set 'capacity'"),
        (("spike",), {"rng": "numpy"}, "rng must be one of True, False, 'all'"),
    ],
)
def test_bad_arguments_fail_at_construction(args, kwargs, match):
    with pytest.raises(RewindError, match=match):
        RewindCallback(*args, **kwargs)


def test_factory_with_too_small_history_is_refused_before_any_step():
    module = Net("adam")
    before = initial_params(module)
    with pytest.raises(RewindError, match="needs capacity >= 3"):
        fit(module, make_batches(4), [RewindCallback(lambda rw: SpikeGuard(rw, rollback=2), capacity=2)])
    assert_same(list(module.parameters()), before)
    assert not module.opt.state and not module.opt._optimizer_step_pre_hooks  # no step, no hooks left behind


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("shard,launch", [(False, "spawn"), (True, "fork")], ids=["full-spawn", "shard-fork"])
def test_ddp_strategy_ranks_take_the_same_decisions(shard, launch):
    """Lightning's DDP (2 CPU processes): a spike on one rank's batch rolls back both ranks together (the callback's
    Rewind agrees over the default process group) and the replicas stay bitwise identical. Both launchers: ddp_spawn
    pickles the callback into fresh interpreters; ddp_fork (notebooks' choice) forks them, ~13 s sooner, since each
    fresh interpreter spends ~12 s importing lightning."""
    script = Path(__file__).with_name("lightning_ddp_worker.py")
    cmd = [sys.executable, str(script)] + (["--shard"] if shard else []) + (["--fork"] if launch == "fork" else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert f"shard: {shard} group: True" in out.stdout and "rolled_back" in out.stdout, out.stdout
    assert "identical: True same decisions: True" in out.stdout, out.stdout


def test_a_second_fit_gets_a_fresh_rewind_with_arenas():
    """fit() twice with one callback: the second fit's Rewind adopts the parameters the first one's arenas held
    (dropped before the new one is built) instead of copying them one by one, and guards as before."""
    cb = RewindCallback("spike", **spike_kwargs())
    net = Net()
    fit(net, make_batches(12), [cb])
    first = weakref.ref(cb.rewind)
    fit(net, make_batches(12, spike=(9,), seed=1), [cb])
    assert first() is None  # freed when the second fit started
    # every parameter and Adam moment is in the arenas (one memcpy per snapshot), none copied one by one
    tensors = [*net.parameters(), *(v for st in net.opt.state.values() for v in st.values() if torch.is_tensor(v))]
    assert cb.rewind.state_nbytes >= sum(t.nbytes for t in tensors)
    assert "rolled_back" in [e.kind for e in cb.log]


# -- resume: the callback's state travels in Lightning's checkpoint ---------------------------------------------------
class FaultyNet(Net):
    """Faults by optimizer step (trainer.global_step survives a resume): the loss x1000 at ``spike`` (inputs x1000
    would not do with BatchNorm, which normalizes them away), a NaN input at ``nan``."""

    def __init__(self, spike=(), nan=(), **kw):
        super().__init__(**kw)
        self.spike, self.nan = set(spike), set(nan)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_step in self.nan:
            x = x.clone()
            x[0, 0] = float("nan")
        loss = F.cross_entropy(self.net(x), y)
        return loss * 1000.0 if self.global_step in self.spike else loss


def resume_kwargs():
    # warmup 16: a detector restarted at the resume would still be warming up 10 steps later
    return dict(detector=SpikeDetector(window=16, warmup=16), rollback=2, skip_batches=1, cooldown=3, ramp=3)


def fit_ckpt(module, batches, cb, root, epochs, ckpt_path=None):
    """fit() with Lightning's default checkpointing left on (a ModelCheckpoint at every epoch's end)."""
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, max_epochs=epochs, num_sanity_val_steps=0, callbacks=[cb],
                        default_root_dir=str(root))  # fmt: skip
    trainer.fit(module, DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("bn", [False, True], ids=["mlp", "batchnorm"])
def test_fit_resumed_from_the_default_checkpoint_takes_the_same_decisions(tmp_path, bn):
    """fit() for one epoch with the default ModelCheckpoint, then a new Trainer, module and callback resumed with
    fit(ckpt_path=...): the same decisions (event log), counters and final state, bit for bit, as two epochs never
    interrupted, including the spike 10 steps after the resume that a restarted detector would let through."""
    n, faults = 24, dict(spike=(17, 34), nan=(5,))  # 34: 10 steps into the second epoch
    batches = make_batches(n)
    ref_cb = RewindCallback("spike", **resume_kwargs())
    ref = FaultyNet(**faults, opt="sgd", sched="step", bn=bn)
    ref_trainer = fit_ckpt(ref, batches, ref_cb, tmp_path / "ref", epochs=2)
    kinds = [e.kind for e in ref_cb.log]
    assert kinds[17] == kinds[34] == "rolled_back" and kinds[5] == "skipped"

    first = FaultyNet(**faults, opt="sgd", sched="step", bn=bn)
    fit_ckpt(first, batches, RewindCallback("spike", **resume_kwargs()), tmp_path / "run", epochs=1)
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("*.ckpt")
    saved = torch.load(ckpt, weights_only=True)["callbacks"]["RewindCallback"]  # plain data: the safe loader reads it
    assert saved["guard"]["detector"]["count"] >= 16 and len(saved["guard"]["log"]["events"]) == n

    cb = RewindCallback("spike", **resume_kwargs())
    module = FaultyNet(**faults, opt="sgd", sched="step", bn=bn)
    trainer = fit_ckpt(module, batches, cb, tmp_path / "run", epochs=2, ckpt_path=ckpt)
    assert values_equal(cb.log.records(), ref_cb.log.records())
    assert trainer.global_step == ref_trainer.global_step == 2 * n and cb.guard.steps == ref_cb.guard.steps
    assert_same_training(module, ref.net, ref.opt, [s for s, _ in ref.scheds])
    assert_same(list(module.buffers()), list(ref.buffers()), "buffers")
    for k in ("rewind/rolled_back", "rewind/skipped", "rewind/undone"):
        assert trainer.callback_metrics[k] == ref_trainer.callback_metrics[k]  # running totals continue too

    # the same resume without the callback's state: the detector warms up again and the spike goes through
    raw = torch.load(ckpt, weights_only=True)
    del raw["callbacks"]["RewindCallback"]
    torch.save(raw, tmp_path / "stateless.ckpt")
    cb = RewindCallback("spike", **resume_kwargs())
    fit_ckpt(FaultyNet(**faults, opt="sgd", sched="step", bn=bn), batches, cb, tmp_path / "x", epochs=2,
             ckpt_path=tmp_path / "stateless.ckpt")  # fmt: skip
    assert [e.kind for e in cb.log][10] == "accepted" and cb.log[10].loss > 100


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: RewindCallback("nonfinite"), "guarding with SpikeGuard, this one guards with NonFiniteGuard"),
        (lambda: RewindCallback("spike", **{**resume_kwargs(), "rollback": 3}), "rollback: 2 saved, 3 here"),
        (lambda: RewindCallback(None), "guarding with SpikeGuard, this one guards with no guard"),
    ],
    ids=["other-guard", "other-settings", "no-guard"],
)
def test_resume_with_another_guard_is_refused_before_any_step(tmp_path, make, match):
    batches = make_batches(8)
    fit_ckpt(FaultyNet(opt="adam"), batches, RewindCallback("spike", **resume_kwargs()), tmp_path, epochs=1)
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    module = FaultyNet(opt="adam")
    with pytest.raises(RewindError, match=match):
        fit_ckpt(module, batches, make(), tmp_path / "again", epochs=2, ckpt_path=ckpt)
    weights = torch.load(ckpt, weights_only=True)["state_dict"]
    assert_same([p.detach() for p in module.parameters()], [weights[k] for k, _ in module.named_parameters()])
    # refused while Lightning restored the checkpoint (a wrong guard type: before configure_optimizers even ran)
    # or when the guard was built (other settings): no step taken, no hooks left behind
    opt = module.opt
    assert opt is None or not (opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks)
