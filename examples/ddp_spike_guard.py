"""SpikeGuard under DistributedDataParallel: a fault on one rank is handled on every rank, together.

    python examples/ddp_spike_guard.py                          # spawns 2 CPU processes (gloo)
    torchrun --nproc-per-node 2 examples/ddp_spike_guard.py     # or let torchrun start them

Digits (scikit-learn, bundled), an MLP, Adam, each rank its own shard of every batch. Rank 1 gets a batch with
inputs x1000 at iteration 60 and rank 0 a NaN at iteration 100. DDP averages gradients, so one rank's fault poisons
every replica: plain training ends in NaN. With ``SpikeGuard`` the decision is taken on the loss averaged over
the ranks (one all-reduce), so every rank drops the same batch (a spike on the next one too would undo the same
steps on every rank) and skips the same batches, and the replicas stay bitwise identical. (The log counts the guard's
iterations: the 2 batches skipped after the spike are not iterations, so batch 100 is iteration 98.)
"""

from __future__ import annotations

import datetime
import gc
import os
import socket

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits

from torchrewind import Rewind, SpikeGuard

FAULTS = {(1, 60): "poison", (0, 100): "nan"}  # (rank, iteration): fault
ITERATIONS, BATCH = 200, 32


def batches(rank: int, world: int):
    d = load_digits()
    X, Y = torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    for i in range(ITERATIONS):
        idx = torch.randint(0, len(Y), (BATCH * world,), generator=g)[rank::world]  # this rank's shard
        x, y = X[idx], Y[idx]
        fault = FAULTS.get((rank, i))
        if fault == "poison":
            x = x * 1000
        elif fault == "nan":
            x = x.clone()
            x[0, 0] = float("nan")
        yield i, x, y


def train(rank: int, world: int, guarded: bool) -> tuple[float, list[str], bool]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    net = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    data = batches(rank, world)
    if guarded:
        rw = Rewind(net, opt, capacity=4)  # group="auto": the default process group
        guard = SpikeGuard(rw, rollback=3, skip_batches=2)
        data = guard.wrap(data)
    loss = torch.tensor(0.0)
    for i, x, y in data:
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        if guarded:
            guard.step(loss)
        else:
            opt.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    identical = all(torch.equal(everyone[0], t) for t in everyone[1:])
    log = guard.log if guarded else []
    events = [f"iteration {e.iteration}: {e.kind} ({e.reason})" for e in log if e.kind != "accepted"]
    final = torch.tensor([loss.item()], dtype=torch.float64)
    dist.all_reduce(final)
    return float(final) / world, events, identical


def main(rank: int, world: int) -> None:
    torch.set_num_threads(1)
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    plain, _, _ = train(rank, world, guarded=False)
    guarded, events, identical = train(rank, world, guarded=True)
    if rank == 0:
        print(f"{world} ranks, {ITERATIONS} iterations, faults {FAULTS}")
        print(f"plain DDP:  final loss {plain:.4f}")
        for e in events:
            print("  " + e)
        print(f"SpikeGuard: final loss {guarded:.4f}; replicas bitwise identical: {identical}")
    # Leave together, with the DDP reducers' gloo work freed first: torch 2.13's gloo can otherwise abort at exit
    # (see pytorch/pytorch#179291).
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        main(dist.get_rank(), dist.get_world_size())
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.multiprocessing.spawn(main, args=(2,), nprocs=2)
