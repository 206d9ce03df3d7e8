import os

import pytest
import torch

_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_leaked_rendezvous():
    """A test that sets MASTER_PORT & co. in this process must not hand them to a later test's subprocess (Lightning
    and torchrun would then all try to listen on that one port)."""
    before = {k: os.environ.get(k) for k in _RENDEZVOUS}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
