import torch

from torchrewind import Rewind


def test_step_undo_step_equals_plain_run():
    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        return m, torch.optim.Adam(m.parameters(), lr=1e-2)

    x, y = torch.randn(16, 4), torch.randn(16, 2)
    ref, ref_opt = make()
    m, opt = make()
    rw = Rewind(m, opt)
    for model, o, undo in ((ref, ref_opt, False), (m, opt, True)):
        for _ in range(3):
            o.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            o.step()
        if undo:
            rw.undo()
            o.step()
    for a, b in zip(ref.parameters(), m.parameters()):
        assert torch.equal(a, b)
        for k in ref_opt.state[a]:
            assert torch.equal(ref_opt.state[a][k], opt.state[b][k])
