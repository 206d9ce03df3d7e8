"""Rewind and the policies under torch.distributed: DDP and FSDP2 in 2 CPU processes with the gloo backend.

Every test spawns a process group; the workers (tests/dist_workers.py) assert on every rank."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from ranks import spawn

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed+gloo"),
]

pytest.importorskip("sklearn")


@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_fault_on_one_rank_rolls_back_all_ranks(wrap):
    import dist_workers

    spawn(dist_workers.guard_agreement, wrap)


def test_buffer_jump_on_one_rank_drops_the_iteration_on_every_rank():
    import dist_workers

    spawn(dist_workers.buffer_jump_agreement)


def test_nonfinite_parameters_on_one_rank_undo_every_rank():
    import dist_workers

    spawn(dist_workers.nonfinite_params_agreement)


def test_line_search_ranks_agree():
    import dist_workers

    spawn(dist_workers.line_search_agreement)


@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_line_search_momentum_restart_ranks_agree(wrap):
    import dist_workers

    spawn(dist_workers.line_search_restart_agreement, wrap)


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_fsdp2_undo_is_bitwise_exact(opt):
    import dist_workers

    spawn(dist_workers.fsdp_undo_is_exact, opt)


@pytest.mark.parametrize("wrap", ["ddp", "fsdp", "ddp-shard"])
def test_host_and_disk_tiers_roll_back_every_rank_to_the_same_step(wrap, tmp_path):
    pytest.importorskip("blosc2")
    import dist_workers

    spawn(dist_workers.tiers_rollback, wrap, str(tmp_path))


def test_ddp_shard_keeps_half_the_history_and_stays_exact():
    import dist_workers

    spawn(dist_workers.ddp_shard)


def test_group_argument_is_checked():
    from torchrewind import Rewind, RewindError

    m = torch.nn.Linear(2, 2)
    o = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(RewindError, match="group must be"):
        Rewind(m, o, group="world")
    with pytest.raises(RewindError, match="not initialized"):
        Rewind(m, o, group=object())
    assert Rewind(m, o).group is None  # not distributed: "auto" means no agreement
    with pytest.raises(RewindError, match="no.*process group|there is none"):
        Rewind(m, o, shard=True)
    assert not o._optimizer_step_pre_hooks or len(o._optimizer_step_pre_hooks) == 1  # failed builds left no hook
