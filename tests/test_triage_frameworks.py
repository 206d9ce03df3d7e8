"""FaultTriage in Lightning (TriageCallback) and the Hugging Face Trainer (TriageTrainerCallback + TriageTrainer),
checked bit for bit: with a transient fault injected into one forward pass, training ends exactly as the same
framework's fault-free run; with a reproducible bad batch, exactly as a run that never had that batch's step
(optimizer and LR scheduler), RNG and BatchNorm statistics included."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, SequentialSampler

from torchrewind import FaultInjector, Quarantine, ReproducibleFaultError, RewindError, SpikeDetector
from torchrewind.errors import RewindTypeError, RewindValueError

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]
warnings.filterwarnings("ignore", ".*does not have many workers.*")

BIG = lambda v, g: "loss above 50" if v > 50 else ""  # noqa: E731


def state(model, opt, sched) -> dict:
    return {"model": {k: v.clone() for k, v in model.state_dict().items()}, "opt": opt.state_dict(),
            "sched": sched.state_dict(), "rng": torch.get_rng_state()}  # fmt: skip


def assert_same(a, b, where="state"):
    """Bitwise equality of nested state (tensors with torch.equal, floats exactly)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ================================================================================================== Lightning


def lightning():
    return pytest.importorskip("lightning.pytorch")


def batches(n, nan=()):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 4, generator=g)
    out = []
    for i in range(n):
        x = torch.randn(32, 16, generator=g)
        y = (x @ w).argmax(1)
        if i in nan:
            x = x.clone()
            x[0, 0] = float("nan")
        out.append((x, y))
    return out


def make_net():
    L = lightning()

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(),
                                           torch.nn.Dropout(0.2), torch.nn.Linear(32, 4))  # fmt: skip
            self.steps_seen = 0

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-2)
            self.sched = torch.optim.lr_scheduler.StepLR(self.opt, 5, 0.5)
            self.epoch_sched = torch.optim.lr_scheduler.ExponentialLR(self.opt, 0.9)
            return [self.opt], [{"scheduler": self.sched, "interval": "step"},
                                {"scheduler": self.epoch_sched, "interval": "epoch"}]  # fmt: skip

    return Net()


def arm_at(steps):
    L = lightning()

    class Arm(L.Callback):
        """Arms an injector on the logits at the given global batch numbers (once per batch: not in a rerun)."""

        def __init__(self):
            self.n = 0
            self.injector = None

        def on_train_start(self, trainer, pl_module):
            self.injector = FaultInjector(pl_module.net[4], kind="scale", factor=1e4)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.n in steps:
                self.injector.arm()
            self.n += 1

    return Arm()


def fit(data, callbacks=(), epochs=1, **kw):
    L = lightning()
    net = make_net()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, max_epochs=epochs,
                        num_sanity_val_steps=0, callbacks=list(callbacks), **kw)  # fmt: skip
    trainer.fit(net, DataLoader(data, batch_size=None))
    return net, state(net.net, net.opt, net.sched) | {"epoch_sched": net.epoch_sched.state_dict()}


def test_lightning_transient_fault_ends_bitwise_as_the_fault_free_fit():
    from torchrewind.integrations.lightning_triage import TriageCallback

    data = batches(24)
    cb = TriageCallback(check=BIG)
    _, got = fit(data, [cb, arm_at({6, 17})], epochs=2)
    _, ref = fit(data, epochs=2)
    assert_same(got, ref)
    assert [(f["iteration"], f["verdict"], f["action"]) for f in cb.triage.faults] == [
        (6, "transient", "continued"), (17, "transient", "continued")
    ]  # fmt: skip
    assert cb.triage.steps == 48 and cb.last_step_stood is True


def test_lightning_reproducible_batch_ends_as_a_fit_without_it_and_a_restart_skips_it(tmp_path):
    from torchrewind.integrations.lightning_triage import TriageCallback

    data = batches(20, nan={7})
    q = tmp_path / "q.jsonl"
    cb = TriageCallback(quarantine=q, batch_id=lambda batch, i: f"batch-{i}")
    _, got = fit(data, [cb])
    _, ref = fit(data[:7] + data[8:])
    assert_same(got, ref)
    (f,) = cb.triage.faults
    assert f["verdict"] == "reproducible" and f["action"] == "skipped" and f["batch"] == "batch-7"
    assert Quarantine(q).ids == ["batch-7"]
    again = TriageCallback(quarantine=q, batch_id=lambda batch, i: f"batch-{i}")
    _, restarted = fit(data, [again])
    assert_same(restarted, ref)
    assert again.triage.faults == [] and again.triage.reruns == 0
    assert [e.reason for e in again.triage.log if e.kind == "skipped"] == ["quarantined batch 'batch-7'"]


def test_lightning_raise_and_refusals(tmp_path):
    L = lightning()
    from torchrewind.integrations.lightning_triage import TriageCallback

    with pytest.raises(ReproducibleFaultError):
        fit(batches(10, nan={4}), [TriageCallback(on_reproducible="raise")])
    with pytest.raises(RewindError, match="accumulate_grad_batches=1"):
        fit(batches(4), [TriageCallback()], accumulate_grad_batches=2)
    with pytest.raises(RewindTypeError, match="no option"):
        TriageCallback(treshold=3)
    with pytest.raises(RewindValueError, match="'rollback' needs a guard"):
        TriageCallback(on_reproducible="rollback")
    with pytest.raises(RewindValueError, match="max_transient must be an int >= 1"):
        TriageCallback(max_transient=0)
    with pytest.raises(RewindValueError, match="cannot set 'capacity'"):
        TriageCallback(rewind_kwargs={"capacity": 3})
    assert L  # imported


def test_lightning_checkpoint_resume_keeps_the_triage_state(tmp_path):
    L = lightning()
    from torchrewind.integrations.lightning_triage import TriageCallback

    data = batches(16, nan={3})
    cb = TriageCallback(detector=SpikeDetector(warmup=4))
    net = make_net()
    ck = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True) if hasattr(L, "pytorch") else None
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, max_epochs=1, num_sanity_val_steps=0,
                        callbacks=[cb] + ([ck] if ck else []), default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(net, DataLoader(data, batch_size=None))
    path = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
    saved = torch.load(path, weights_only=False)["callbacks"]
    (entry,) = [v for k, v in saved.items() if "TriageCallback" in k]
    assert entry["triage"]["iteration"] == 16 and entry["triage"]["reproducible"] == 1
    cb2 = TriageCallback(detector=SpikeDetector(warmup=4))
    trainer2 = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, max_epochs=2, num_sanity_val_steps=0, callbacks=[cb2],
                         default_root_dir=tmp_path, enable_checkpointing=False)  # fmt: skip
    trainer2.fit(make_net(), DataLoader(data, batch_size=None), ckpt_path=path)
    assert cb2.triage.iteration == 32 and cb2.triage.reproducible == 2 and len(cb2.triage.faults) == 2
    assert cb2.triage.detector.count == cb.triage.detector.count + 15


# ================================================================================================== Hugging Face


def hf():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import transformers

    return transformers


class Reg(torch.nn.Module):
    """Tiny regression model with dropout (the RNG must be restored for the rerun) and a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.norm, self.drop, self.l2 = (torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
                                                  torch.nn.Dropout(0.1), torch.nn.Linear(16, 1))  # fmt: skip

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        out = self.l2(self.drop(torch.relu(self.norm(self.l1(x))))).squeeze(-1)
        return {"loss": F.mse_loss(out, labels) if labels is not None else None, "logits": out}


def reg_data(n_steps, nan=(), b=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_steps * b, 8, generator=g)
    y = x[:, :4].sum(1) + 0.1 * torch.randn(len(x), generator=g)
    for s in nan:
        x[s * b, 0] = float("nan")
    return [{"x": x[i], "labels": y[i]} for i in range(len(x))]


def train_hf(tmp_path, data, steps, callbacks=(), triage=True, **kw):
    t = hf()
    from torchrewind.integrations.hf_triage import TriageTrainer

    base = TriageTrainer if triage else t.Trainer

    class Seq(base):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    torch.manual_seed(0)
    model = Reg()
    args = t.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no",
                               logging_strategy="no", max_steps=steps, per_device_train_batch_size=4,
                               dataloader_num_workers=0, seed=7, learning_rate=1e-2, disable_tqdm=True, **kw)  # fmt: skip
    tr = Seq(model=model, args=args, train_dataset=data, data_collator=t.default_data_collator,
             callbacks=list(callbacks))  # fmt: skip
    tr.train()
    return model, tr


def plain_hf(data, steps, skip=()):
    """The Trainer's numerics in a plain loop (see tests/test_hf.py); batches in ``skip`` are drawn, not computed."""
    t = hf()
    torch.manual_seed(0)
    model = Reg()
    t.set_seed(7)
    decay = [p for n, p in model.named_parameters() if "bias" not in n and not n.startswith("norm")]
    rest = [p for n, p in model.named_parameters() if "bias" in n or n.startswith("norm")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0}, {"params": rest, "weight_decay": 0.0}], lr=1e-2,
                            betas=(0.9, 0.999), eps=1e-8, fused=True)  # fmt: skip
    sched = t.get_linear_schedule_with_warmup(opt, 0, steps)
    it = iter(DataLoader(data, batch_size=4, sampler=SequentialSampler(data), collate_fn=t.default_data_collator))
    model.train()
    for i in range(steps):
        batch = next(it)
        if i in skip:
            continue
        model(**batch)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        model.zero_grad()
    return model, opt, sched


def hf_state(model, tr):
    return state(model, tr.optimizer.optimizer, tr.lr_scheduler)


def test_hf_transient_fault_ends_bitwise_as_the_fault_free_trainer(tmp_path):
    t = hf()
    from torchrewind.integrations.hf_triage import TriageTrainerCallback

    class Arm(t.TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            self.inj = FaultInjector(model.l2, kind="scale", factor=1e4)

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step in (5, 11):
                self.inj.arm()

    data = reg_data(16)
    cb = TriageTrainerCallback(check=BIG)
    m, tr = train_hf(tmp_path, data, 16, [cb, Arm()])
    m0, tr0 = train_hf(tmp_path, data, 16, triage=False)
    assert_same(hf_state(m, tr), hf_state(m0, tr0))
    assert [(f["iteration"], f["verdict"]) for f in cb.triage.faults] == [(5, "transient"), (11, "transient")]


def test_hf_reproducible_batch_ends_as_a_loop_that_skipped_its_step_and_a_restart_skips_it(tmp_path):
    from torchrewind.integrations.hf_triage import TriageTrainerCallback

    data = reg_data(14, nan=(6,))
    q = tmp_path / "q.jsonl"
    cb = TriageTrainerCallback(quarantine=q)
    m, tr = train_hf(tmp_path, data, 14, [cb])
    ref = plain_hf(data, 14, skip={6})
    assert_same(hf_state(m, tr), state(*ref))
    (f,) = cb.triage.faults
    assert f["verdict"] == "reproducible" and f["action"] == "skipped" and json.loads(q.read_text())["batch"] == 6
    cb2 = TriageTrainerCallback(quarantine=q)
    m2, tr2 = train_hf(tmp_path, data, 14, [cb2])
    assert_same(hf_state(m2, tr2), state(*ref))
    assert cb2.triage.faults == [] and cb2.triage.reruns == 0


def test_hf_refusals(tmp_path):
    from torchrewind.integrations.hf_triage import TriageTrainerCallback

    with pytest.raises(RewindError, match="gradient_accumulation_steps=1"):
        train_hf(tmp_path, reg_data(4), 2, [TriageTrainerCallback()], gradient_accumulation_steps=2)
    with pytest.raises(ReproducibleFaultError):
        train_hf(tmp_path, reg_data(6, nan=(2,)), 6, [TriageTrainerCallback(on_reproducible="raise")])
    with pytest.raises(RewindTypeError, match="batch_id must be a function"):
        TriageTrainerCallback(batch_id=3)
