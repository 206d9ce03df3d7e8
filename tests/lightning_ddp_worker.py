"""RewindCallback under Lightning's DDP (2 CPU processes, gloo; ``ddp_spawn``, or ``ddp_fork`` with ``--fork``): run by
tests/test_lightning.py.

A batch seen by rank 1 only is poisoned (inputs x1000). Prints, on rank 0, each rank's non-accepted decisions and
whether the ranks' parameters are bitwise identical after training."""

import logging
import sys
import warnings

import lightning.pytorch as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from torchrewind.integrations.lightning import RewindCallback

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class Batches(Dataset):
    """Each item is a whole batch; Lightning's DistributedSampler gives each rank every other index (121: rank 1)."""

    def __len__(self) -> int:
        return 400

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(32, 16, generator=g)
        y = (x.sum(1) > 0).long()
        return (x * 1000 if i == 121 else x), y


class Model(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Report(L.Callback):
    def __init__(self, cb: RewindCallback) -> None:
        self.cb = cb

    def on_train_end(self, trainer, pl_module):
        kinds = [(e.kind, e.undone) for e in self.cb.log if e.kind != "accepted"]
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        out = [None, None]; dist.all_gather_object(out, (kinds, flat))
        if trainer.global_rank == 0:
            rw = self.cb.rewind
            print("shard:", rw.shard, "group:", rw.group is not None, "events rank0:", out[0][0], "rank1:", out[1][0])
            print("identical:", torch.equal(out[0][1], out[1][1]), "same decisions:", out[0][0] == out[1][0])

if __name__ == "__main__":
    cb = RewindCallback("spike", rollback=2, skip_batches=1, rewind_kwargs={"shard": "--shard" in sys.argv})
    strategy = "ddp_fork" if "--fork" in sys.argv else "ddp_spawn"
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[cb, Report(cb)])  # fmt: skip
    trainer.fit(Model(), DataLoader(Batches(), batch_size=None))
