import os

import pytest
import torch

_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny networks (``pytestmark = pytest.mark.usefixtures("one_thread")``): one intra-op thread is
    far faster than two contended ones on a 2-core runner (BatchNorm parallelises even 6 channels). Both runs of every
    comparison are in the same process, so the thread count cannot affect exactness. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
