"""RewindTrainerCallback under the Hugging Face Trainer with DDP (torchrun, 2 CPU processes, gloo): run by
tests/test_hf.py as
``python -m torch.distributed.run --standalone --nproc-per-node 2 hf_ddp_worker.py OUT_DIR full,shard``.

One batch has its labels x1000; the Trainer's DistributedSampler puts it on one rank. Prints, on rank 0, each rank's
non-accepted decisions and whether the ranks' parameters are bitwise identical after training."""

import gc
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import TrainingArguments, default_data_collator

from torchrewind.integrations.hf import RewindTrainer, RewindTrainerCallback

warnings.filterwarnings("ignore")


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(8, 32), torch.nn.Linear(32, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
        out = self.l2(torch.relu(self.l1(x))).squeeze(-1)
        return {"loss": F.mse_loss(out, labels), "logits": out}


def data(n: int = 800) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    y = x[:, :4].sum(1)
    y[400:404] *= 1000.0
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def train(out_dir: str, shard: bool) -> None:
    torch.manual_seed(0)
    cb = RewindTrainerCallback("spike", rollback=2, rewind_kwargs={"shard": shard})
    args = TrainingArguments(output_dir=out_dir, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", max_steps=100, per_device_train_batch_size=4,
                             dataloader_num_workers=0, seed=7, learning_rate=1e-2, disable_tqdm=True,
                             ddp_backend="gloo")  # fmt: skip
    trainer = RewindTrainer(model=Net(), args=args, train_dataset=data(), data_collator=default_data_collator,
                            callbacks=[cb])  # fmt: skip
    trainer.train()
    kinds = [(e.iteration, e.kind) for e in cb.log if e.kind != "accepted"]
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, (kinds, flat))
    if dist.get_rank() == 0:
        rw = cb.rewind
        print("world", dist.get_world_size(), "shard:", rw.shard, "group:", rw.group is not None, "events:", out[0][0],
              out[1][0])  # fmt: skip
        print("identical:", torch.equal(out[0][1], out[1][1]), "same decisions:", out[0][0] == out[1][0], flush=True)
    # leave together, with the DDP reducer's gloo work freed first: torch 2.13's gloo can abort at interpreter exit
    # otherwise (pytorch/pytorch#179291)
    del trainer
    dist.barrier()
    gc.collect()


if __name__ == "__main__":
    # one launch trains once per mode, one after the other in the same ranks (as a sweep in one job would): each
    # fresh torchrun rank spends ~10 s importing transformers
    for mode in sys.argv[2].split(","):
        train(sys.argv[1], shard=mode == "shard")
    dist.destroy_process_group()
