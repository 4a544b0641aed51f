import math

import pytest
import torch

from qdrop_hf.optim import Adam, cosine_lr


def test_adam_matches_torch_fused_adam_bit_for_bit():
    """Same updates as torch.optim.Adam(fused=True) over steps with a changing learning rate, a
    tensor with no gradient left alone as torch leaves it."""
    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(16, 9, generator=gen), torch.randn((), generator=gen), torch.randn(5, generator=gen)]
    theirs = [p.clone() for p in ours]
    start = [p.clone() for p in ours]
    opt = Adam(ours, lr=1e-2)
    ref = torch.optim.Adam(theirs, lr=1e-2, fused=True)
    for step in range(6):
        lr = cosine_lr(1e-2, step, 6)
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad = g, g.clone()
        ours[2].grad = theirs[2].grad = None  # never reached by the forward pass
        opt.step(lr)
        ref.param_groups[0]["lr"] = lr
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)
    assert not torch.equal(ours[0], start[0]) and torch.equal(ours[2], start[2])


@pytest.mark.parametrize("total", [7, 500])
def test_cosine_lr_is_torchs_schedule(total):
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=0.0)
    for step in range(total):
        assert math.isclose(cosine_lr(0.3, step, total), opt.param_groups[0]["lr"], rel_tol=1e-9, abs_tol=1e-15)
        opt.step()
        sched.step()
