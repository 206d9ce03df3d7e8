"""Hugging Face Trainer integration: RewindTrainerCallback + RewindTrainer, checked bit for bit (torch.equal).

The reference for the Trainer runs is a plain PyTorch loop with ``guard.step(loss)`` that reproduces the Trainer's
numerics: same model and seed, same batches in the same order, the optimizer the Trainer builds by default (fused
AdamW, weight decay on all but biases/LayerNorm), its linear schedule, loss / gradient_accumulation_steps per
micro-batch, clip_grad_norm_(max_grad_norm), step, ``if stood: sched.step()``, zero_grad. A fault-free run checks that
this loop is the Trainer's numerics before any guard decision is compared.
"""


import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torch.utils.data import DataLoader, SequentialSampler  # noqa: E402
from transformers import (  # noqa: E402
    Trainer,
    TrainingArguments,
    default_data_collator,
    get_linear_schedule_with_warmup,  # noqa: E402
    set_seed,
)

from torchrewind import NonFiniteGuard, Rewind, RewindError, SpikeDetector, SpikeGuard  # noqa: E402
from torchrewind.core.values import values_equal  # noqa: E402
from torchrewind.integrations.hf import RewindTrainer, RewindTrainerCallback  # noqa: E402

SEED, B, LR, WD = 7, 4, 1e-2, 0.01


class Net(torch.nn.Module):
    """Tiny regression model with dropout (so RNG restoration matters) and a LayerNorm (a no-decay group)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.norm, self.drop, self.l2 = (torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
                                                  torch.nn.Dropout(0.1), torch.nn.Linear(16, 1))  # fmt: skip

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        out = self.l2(self.drop(torch.relu(self.norm(self.l1(x))))).squeeze(-1)
        return {"loss": F.mse_loss(out, labels) if labels is not None else None, "logits": out}


def dataset(n_steps: int, ga: int = 1, spike: tuple[int, ...] = (), nan: tuple[int, ...] = ()) -> list[dict]:
    """Items for n_steps optimizer steps of ga micro-batches of B; faults in the first micro-batch of a step."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_steps * ga * B, 8, generator=g)
    y = x[:, :4].sum(1) + 0.1 * torch.randn(len(x), generator=g)
    for s in spike:
        y[s * ga * B : s * ga * B + B] *= 1000.0  # a loss spike
    for s in nan:
        x[s * ga * B, 0] = float("nan")  # NaN loss and gradients
    return [{"x": x[i], "labels": y[i]} for i in range(len(x))]


class SeqTrainer(RewindTrainer):
    def _get_train_sampler(self, train_dataset=None):  # the reference loop reads the batches in the same order
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def args(tmp_path, steps: int, ga: int = 1, **kw) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", max_steps=steps, per_device_train_batch_size=B,
                             gradient_accumulation_steps=ga, dataloader_num_workers=0, seed=SEED, learning_rate=LR,
                             weight_decay=WD, disable_tqdm=True, **kw)  # fmt: skip


def train_hf(tmp_path, data, steps, ga=1, callback=None, cls=SeqTrainer, **kw):
    torch.manual_seed(0)
    model = Net()
    trainer = cls(model=model, args=args(tmp_path, steps, ga, **kw), train_dataset=data,
                  data_collator=default_data_collator, callbacks=[callback] if callback else None)  # fmt: skip
    trainer.train()
    return model, trainer


def train_plain(data, steps, ga=1, make_guard=None):
    """The reference: a plain loop with the Trainer's numerics, guard.step(loss) in place of opt.step()."""
    torch.manual_seed(0)
    model = Net()
    set_seed(SEED)  # what Trainer.__init__ does
    decay = [p for n, p in model.named_parameters() if "bias" not in n and not n.startswith("norm")]
    rest = [p for n, p in model.named_parameters() if "bias" in n or n.startswith("norm")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": rest, "weight_decay": 0.0}], lr=LR,
                            betas=(0.9, 0.999), eps=1e-8, fused=True)  # fmt: skip
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    guard = make_guard(model, opt, sched) if make_guard else None
    it = iter(DataLoader(data, batch_size=B, sampler=SequentialSampler(data), collate_fn=default_data_collator))
    model.train()
    for _ in range(steps):
        total = 0.0
        for _ in range(ga):
            loss = model(**next(it))["loss"] / ga
            loss.backward()
            total = total + loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if guard is None:
            opt.step()
            sched.step()
        elif guard.step(total):
            sched.step()
        model.zero_grad()
    return model, opt, sched, guard


def assert_same(m1, o1, s1, m2, o2, s2) -> None:
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    assert len(o1.state) == len(o2.state)
    params = [[p for g in o.param_groups for p in g["params"]] for o in (o1, o2)]
    for p1, p2 in zip(*params):
        for k, v in o1.state[p1].items():
            assert torch.equal(v, o2.state[p2][k]), k
    assert [g["lr"] for g in o1.param_groups] == [g["lr"] for g in o2.param_groups]
    assert s1.state_dict()["last_epoch"] == s2.state_dict()["last_epoch"]
    assert s1.get_last_lr() == s2.get_last_lr()


def test_plain_loop_reproduces_trainer(tmp_path):
    data = dataset(6)
    m, tr = train_hf(tmp_path, data, 6)
    ref = train_plain(data, 6)
    assert_same(m, tr.optimizer.optimizer, tr.lr_scheduler, *ref[:3])


@pytest.mark.parametrize("ga", [1, 2])
def test_spike_and_nan_equal_plain_loop_guard(tmp_path, ga):
    """A loss spike (rolled back: 2 earlier steps undone, 1 batch skipped, lr cooled down) and a NaN batch (skipped)
    leave exactly the state of guard.step(loss) in a plain loop; with ga=2 the loss judged is the sum over
    micro-batches."""
    steps, spike, nan = 22, (12,), (17,)
    kw = dict(rollback=2, skip_batches=1, cooldown=2, ramp=2, drop_first=False)
    data = dataset(steps, ga, spike, nan)
    cb = RewindTrainerCallback("spike", detector=SpikeDetector(window=10, warmup=5), **kw)
    model, trainer = train_hf(tmp_path, data, steps, ga, cb)
    ref = train_plain(data, steps, ga, lambda m, o, s: SpikeGuard(
        Rewind(m, o, schedulers=[s], capacity=2), detector=SpikeDetector(window=10, warmup=5), **kw))
    opt, sched = trainer.optimizer.optimizer, trainer.lr_scheduler
    assert_same(model, opt, sched, *ref[:3])
    got, want = cb.log.events, ref[3].log.events
    # the same decisions, on the same losses (repr: exact, and nan == nan) and lrs
    assert [(e.iteration, e.step, e.kind, repr(e.loss), e.lrs, e.reason) for e in got] == \
           [(e.iteration, e.step, e.kind, repr(e.loss), e.lrs, e.reason) for e in want]  # fmt: skip
    # `undone` also counts the step the Trainer took and the guard then undid (never taken by guard.step)
    assert [e.undone for e in got] == [e.undone + (e.kind != "accepted") for e in want]
    kinds = {e.iteration: e.kind for e in got}
    assert kinds[12] == "rolled_back" and kinds[13] == "skipped" and kinds[17] == "skipped"
    assert got[12].undone == 3  # the spiking step itself + rollback=2
    assert any("cool-down" in e.reason for e in got)
    assert sched.last_epoch == cb.guard.steps == steps - 3 - 2  # schedule follows the steps that stand
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_batch_undone_training_continues(tmp_path):
    steps, data = 8, dataset(8, nan=(3,))
    bad, _ = train_hf(tmp_path, data, steps)  # SeqTrainer without the callback: the NaN batch kills training
    assert not all(torch.isfinite(p).all() for p in bad.parameters())
    cb = RewindTrainerCallback("nonfinite")
    model, trainer = train_hf(tmp_path, data, steps, callback=cb)
    assert [e.kind for e in cb.log] == ["accepted"] * 3 + ["skipped"] + ["accepted"] * 4
    assert cb.log[3].undone == 1 and "non-finite loss" in cb.log[3].reason
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.state.global_step == steps and cb.guard.steps == steps - 1
    ref = train_plain(data, steps, make_guard=lambda m, o, s: NonFiniteGuard(Rewind(m, o, schedulers=[s])))
    assert_same(model, trainer.optimizer.optimizer, trainer.lr_scheduler, *ref[:3])


def test_lr_scheduler_rolled_back(tmp_path):
    """Trainer's default linear schedule: an undone step does not advance it; Rewind.undo() restores it."""
    steps, data = 10, dataset(10, nan=(2, 6))
    cb = RewindTrainerCallback("nonfinite", capacity=2)
    _, trainer = train_hf(tmp_path, data, steps, callback=cb)
    sched, opt = trainer.lr_scheduler, trainer.optimizer.optimizer
    assert sched.last_epoch == 8 and sched.get_last_lr()[0] == pytest.approx(LR * (1 - 8 / steps))
    assert [g["lr"] for g in opt.param_groups] == sched.get_last_lr()
    last = [g["lr"] for g in opt.param_groups]
    before = [p.detach().clone() for p in trainer.model.parameters()]
    cb.rewind.undo()  # the last step, taken with the lr the schedule had at epoch 7
    assert sched.last_epoch == 7 and [g["lr"] for g in opt.param_groups] == sched.get_last_lr() != last
    assert not all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    cb.rewind.redo()
    assert sched.last_epoch == 8 and all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))


def test_accumulated_loss_with_num_items_in_batch(tmp_path):
    """A model that takes num_items_in_batch: the Trainer normalizes each micro-batch by the token count of the whole
    optimizer step, so the loss judged is the token mean over all micro-batches (not a mean of their means)."""
    from transformers import TrainerCallback

    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.out = torch.nn.Embedding(32, 16), torch.nn.Linear(16, 32)

        def forward(self, input_ids, labels=None, num_items_in_batch=None, **kwargs):  # **kwargs: takes loss kwargs
            logits = self.out(torch.tanh(self.emb(input_ids)))
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            return {"loss": loss / num_items_in_batch, "logits": logits}

    steps, ga, n = 3, 2, 3 * 2 * B
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (n, 8), generator=g)
    labels = ids.roll(1, 1)
    for i in range(n):
        labels[i, 8 - 6 * (i // B % 2) :] = -100  # micro-batches of 32 and 8 tokens
    data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]
    expect, means = [], []

    class Probe(TrainerCallback):  # the step's loss at its pre-step parameters, from all its micro-batches at once
        def on_pre_optimizer_step(self, args, state, control, model, **kw):
            i = state.global_step * ga * B
            with torch.no_grad():
                lg = model(ids[i : i + ga * B], labels[i : i + ga * B], 1)["logits"]
                tok = F.cross_entropy(lg.flatten(0, 1), labels[i : i + ga * B].flatten(), reduction="none")
            ok = labels[i : i + ga * B].flatten() != -100
            expect.append(tok[ok].mean().item())
            per = [tok[j * B * 8 : (j + 1) * B * 8][ok[j * B * 8 : (j + 1) * B * 8]].mean().item() for j in range(ga)]
            means.append(sum(per) / ga)

    torch.manual_seed(0)
    cb = RewindTrainerCallback("nonfinite")
    trainer = SeqTrainer(model=Tagger(), args=args(tmp_path, steps, ga), train_dataset=data,
                         data_collator=default_data_collator, callbacks=[cb, Probe()])  # fmt: skip
    assert trainer.model_accepts_loss_kwargs
    trainer.train()
    got = [e.loss for e in cb.log]
    assert got == pytest.approx(expect, rel=1e-5)  # one value computed two ways: equal up to rounding
    assert got != pytest.approx(means, rel=1e-3)  # and the test tells the two normalizations apart


def test_step_not_taken_then_undo(tmp_path):
    """A step the Trainer did not take (as after a GradScaler overflow) is logged as skipped, and an undo of the next
    step goes back to just before that next step (RNG after its dropout draws), not to the older undo point."""
    from transformers import TrainerCallback

    class Probe(TrainerCallback):  # listed after the RewindTrainerCallback: runs after before_step / after_step
        def on_pre_optimizer_step(self, args, state, control, **kw):
            if state.global_step == 2:  # accelerate's optimizer wrapper skips the step when not syncing
                trainer.accelerator.gradient_state._set_sync_gradients(False)
            self.rng = torch.get_rng_state()
            self.params = [p.detach().clone() for p in kw["model"].parameters()]

        def on_optimizer_step(self, args, state, control, **kw):
            trainer.accelerator.gradient_state._set_sync_gradients(True)
            if state.global_step == 3:  # the NaN step was undone to exactly its own boundary
                assert torch.equal(torch.get_rng_state(), self.rng)
                assert all(torch.equal(a, p) for a, p in zip(self.params, kw["model"].parameters()))
                self.checked = True

    cb, probe = RewindTrainerCallback("nonfinite"), Probe()
    torch.manual_seed(0)
    trainer = SeqTrainer(model=Net(), args=args(tmp_path, 5), train_dataset=dataset(5, nan=(3,)),
                         data_collator=default_data_collator, callbacks=[cb, probe])  # fmt: skip
    trainer.train()
    assert probe.checked and [e.kind for e in cb.log] == ["accepted", "accepted", "skipped", "skipped", "accepted"]
    assert "optimizer.step() was not called" in cb.log[2].reason and cb.log[3].undone == 1
    assert trainer.lr_scheduler.last_epoch == 3

def test_errors(tmp_path):
    with pytest.raises(RewindError, match="RewindTrainerMixin"):  # a plain Trainer never hands the loss over
        train_hf(tmp_path, dataset(2), 2, callback=RewindTrainerCallback("nonfinite"), cls=Trainer)
    with pytest.raises(RewindError, match="capacity >= 3"):
        RewindTrainerCallback("spike", capacity=2, rollback=2)
    with pytest.raises(RewindError, match="capacity must be >= rollback"):
        RewindTrainerCallback("spike", capacity=1)
    with pytest.raises(RewindError, match="guard must be one of"):
        RewindTrainerCallback("nan")
    with pytest.raises(RewindError, match=r"no option\(s\) \['skip_batches'\]"):
        RewindTrainerCallback("nonfinite", skip_batches=2)
    with pytest.raises(RewindError, match="cannot set 'capacity'"):
        RewindTrainerCallback("nonfinite", rewind_kwargs={"capacity": 3})
    assert RewindTrainerCallback("spike").capacity == 2  # rollback=1 + the just-taken step
    assert RewindTrainerCallback("spike", 5).guard_kwargs["rollback"] == 4
    cb = RewindTrainerCallback("nonfinite", max_consecutive=2)  # the guard's own error ends training
    with pytest.raises(RewindError, match="2 consecutive iterations were not applied"):
        train_hf(tmp_path, dataset(4, nan=(1, 2)), 4, callback=cb)


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_ranks_take_the_same_decisions(tmp_path):
    """The Trainer under torchrun (2 CPU processes, DDP over gloo): a spike on one rank's batch rolls back both ranks
    together (the callback's Rewind agrees over the default process group); replicas stay bitwise identical. With a
    full history on every rank, then (a second Trainer in the same ranks) with the history sharded over them."""
    script = Path(__file__).with_name("hf_ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(tmp_path), "full,shard"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    line = r"world 2 shard: (\w+) group: True events: (.*)\nidentical: True same decisions: True"
    runs = re.findall(line, out.stdout)
    assert [shard for shard, _ in runs] == ["False", "True"], out.stdout
    assert all("rolled_back" in events for _, events in runs), out.stdout


# -- resume: the callback's state travels in the checkpoint's trainer_state.json --------------------------------------
def resume_args(tmp_path, steps: int) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="steps",
                             save_steps=12, logging_strategy="no", max_steps=steps, per_device_train_batch_size=B,
                             dataloader_num_workers=0, seed=SEED, learning_rate=LR, weight_decay=WD,
                             disable_tqdm=True)  # fmt: skip


def resume_callback(guard="spike", **kw):
    # warmup 16: a detector restarted at the resume would still be warming up 10 steps later
    return RewindTrainerCallback(guard, **({} if guard != "spike" else dict(
        detector=SpikeDetector(window=16, warmup=16), rollback=2, skip_batches=1, cooldown=2, ramp=2)), **kw)


def train_resumable(out, data, steps, cb, resume=None):
    torch.manual_seed(resume is not None)  # another init when resuming: the weights come from the checkpoint
    model = Net()
    trainer = SeqTrainer(model=model, args=resume_args(out, steps), train_dataset=data,
                         data_collator=default_data_collator, callbacks=[cb])  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_train_resumed_from_a_checkpoint_takes_the_same_decisions(tmp_path):
    """save_steps=12, then a new Trainer, model and callback with train(resume_from_checkpoint=checkpoint-12): the
    same decisions (event log) and the same final state, bit for bit, as the run never interrupted, including the
    spike 10 steps after the resume that a restarted detector would let through."""
    import json
    import shutil

    steps = 30
    data = dataset(steps, spike=(22,), nan=(5,))
    ref_cb = resume_callback()
    ref_model, ref_trainer = train_resumable(tmp_path / "ref", data, steps, ref_cb)
    kinds = [e.kind for e in ref_cb.log]
    assert kinds[5] == "skipped" and kinds[22] == "rolled_back"

    ckpt = tmp_path / "ref" / "checkpoint-12"
    saved = json.loads((ckpt / "trainer_state.json").read_text())["stateful_callbacks"]["RewindTrainerCallback"]
    assert saved["torchrewind"]["global_step"] == 12 and saved["args"]["guard"] == "spike"
    cb = resume_callback()
    model, trainer = train_resumable(tmp_path / "run", data, steps, cb, resume=str(ckpt))
    assert values_equal(cb.log.records(), ref_cb.log.records())
    assert cb.guard.steps == ref_cb.guard.steps and trainer.state.global_step == steps
    assert_same(model, trainer.optimizer.optimizer, trainer.lr_scheduler,
                ref_model, ref_trainer.optimizer.optimizer, ref_trainer.lr_scheduler)  # fmt: skip

    # the same resume without the callback's state: the detector warms up again and the spike goes through
    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare)
    st = json.loads((bare / "trainer_state.json").read_text())
    del st["stateful_callbacks"]["RewindTrainerCallback"]
    (bare / "trainer_state.json").write_text(json.dumps(st))
    cb = resume_callback()
    train_resumable(tmp_path / "bare_run", data, steps, cb, resume=str(bare))
    assert cb.log[10].kind == "accepted" and cb.log[10].loss > 100


def test_resume_with_another_guard_is_refused_before_any_step(tmp_path):
    data = dataset(12)
    train_resumable(tmp_path, data, 12, resume_callback())
    for cb, match in [(resume_callback("nonfinite"), "guarding with SpikeGuard, this one guards with NonFiniteGuard"),
                      (resume_callback(max_rollbacks=5), "max_rollbacks: 20 saved, 5 here")]:  # fmt: skip
        with pytest.raises(RewindError, match=match):
            train_resumable(tmp_path / "again", data, 24, cb, resume=str(tmp_path / "checkpoint-12"))
        assert cb.guard is None and cb.rewind is None  # refused before a step (no hooks left on the optimizer)


def test_restore_callback_states_from_checkpoint(tmp_path):
    """With the Trainer's restore_callback_states_from_checkpoint=True it replaces the callback by one rebuilt from
    the saved JSON-able options: that one resumes as well; options that are objects (a SpikeDetector) do not survive
    the rebuild, and the mismatch is refused with a hint to leave the flag off."""
    data = dataset(24, spike=(20,))

    def run(out, cb, resume=None):
        torch.manual_seed(1)
        a = resume_args(out, 24)
        a.restore_callback_states_from_checkpoint = True
        trainer = SeqTrainer(model=Net(), args=a, train_dataset=data, data_collator=default_data_collator,
                             callbacks=[cb])  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    ref = RewindTrainerCallback("spike", rollback=2, skip_batches=1)
    run(tmp_path / "a", ref)
    trainer = run(tmp_path / "b", RewindTrainerCallback("spike", rollback=2, skip_batches=1),
                  resume=str(tmp_path / "a" / "checkpoint-12"))  # fmt: skip
    (rebuilt,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, RewindTrainerCallback)]
    assert values_equal(rebuilt.log.records(), ref.log.records()) and ref.log[20].kind == "rolled_back"

    run(tmp_path / "c", resume_callback())
    with pytest.raises(RewindError, match="(?s)window: 16 saved, 50 here.*leave the flag False"):
        run(tmp_path / "d", resume_callback(), resume=str(tmp_path / "c" / "checkpoint-12"))
