"""SpikeGuard inside a Hugging Face Trainer: a tiny GPT-2 survives a corrupted shard and a NaN batch.

    python examples/hf_spike_guard.py          # CPU, < 30 s, nothing downloaded

The data is a stream of synthetic token sequences (arithmetic progressions mod 61, easy to learn). Steps 80-81 see
random tokens (a corrupted shard: a loss spike) and step 140 produces NaN (a stand-in for an fp16 overflow). A plain
``Trainer`` ends with NaN weights; ``RewindTrainer`` with ``RewindTrainerCallback("spike")`` undoes the spiking step
(the Trainer took it) and drops its batch, does not apply the next batch's step (``skip_batches=1``), skips the NaN
step, and finishes. (Had the batch after a spike spiked too, the guard would also have undone the ``rollback=2`` steps
before it and cooled the lr down; ``drop_first=False`` does that at every spike.)
"""

import logging
import tempfile

import torch
from torch.utils.data import IterableDataset
from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from torchrewind.integrations.hf import RewindTrainer, RewindTrainerCallback

STEPS, BATCH, SEQ, VOCAB, POISON = 200, 16, 16, 64, 63  # token POISON never occurs in clean data
CORRUPT, NAN = (80, 81), (140,)
hf_logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)


class Stream(IterableDataset):
    """One batch per optimizer step, in order (an IterableDataset is not shuffled by the Trainer)."""

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for step in range(STEPS):
            for _ in range(BATCH):
                a, d = torch.randint(0, 61, (2,), generator=g).tolist()
                ids = (a + (d % 7 + 1) * torch.arange(SEQ)) % 61
                if step in CORRUPT:
                    ids = torch.randint(0, 61, (SEQ,), generator=g)
                if step in NAN:
                    ids[0] = POISON
                yield {"input_ids": ids, "labels": ids}


def nan_on_poison(module, inputs, output):  # what an overflow does: the whole batch's activations turn NaN
    return output * float("nan") if (inputs[0] == POISON).any() else output


def train(guarded: bool) -> float:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=64, n_layer=2, n_head=2))
    model.transformer.wte.register_forward_hook(nan_on_poison)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, max_steps=STEPS, learning_rate=3e-3,
                             per_device_train_batch_size=BATCH, dataloader_num_workers=0, seed=0)  # fmt: skip
    cb = RewindTrainerCallback("spike", rollback=2, skip_batches=1) if guarded else None
    cls = RewindTrainer if guarded else Trainer
    trainer = cls(model=model, args=args, train_dataset=Stream(), callbacks=[cb] if cb else None)
    trainer.remove_callback(PrinterCallback)  # quiet: print only what the guard did
    trainer.train()
    if cb:
        print("RewindTrainerCallback decisions:", cb.log.counts())
        for e in cb.log:
            if e.kind != "accepted":
                print(f"  iteration {e.iteration}: {e.kind:11s} loss={e.loss:.3g} undone={e.undone} {e.reason}")
        print(f"  {cb.guard.steps} of {STEPS} steps stand; the LR schedule followed them: it is at step "
              f"{trainer.lr_scheduler.last_epoch}")
    g = torch.Generator().manual_seed(1)
    a, d = torch.randint(0, 61, (2, 64, 1), generator=g)  # held-out clean sequences
    ids = (a + (d % 7 + 1) * torch.arange(SEQ)) % 61
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


print(f"plain Trainer:                 final loss {train(False):.4f}")
print(f"RewindTrainer + SpikeGuard:    final loss {train(True):.4f}")
