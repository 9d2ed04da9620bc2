"""palate.core.stats: the gradient clip matches torch's on the same gradients."""

import pytest
import torch

from palate.core.stats import clip_grad_norm


@pytest.mark.parametrize("max_norm", [0.05, 1e3])
def test_clip_grad_norm_matches_torch(max_norm):
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 4), (64,), (64, 64), (2, 64), (2,)]
    a = [torch.zeros(s, requires_grad=True) for s in shapes]
    b = [torch.zeros(s, requires_grad=True) for s in shapes]
    for x, y in zip(a, b):
        g = torch.randn(x.shape, generator=gen)
        x.grad, y.grad = g.clone(), g.clone()
    ours = clip_grad_norm(a, max_norm)
    theirs = torch.nn.utils.clip_grad_norm_(b, max_norm)
    torch.testing.assert_close(ours, theirs)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)
    if max_norm > 1e2:  # under the limit: untouched
        assert all(torch.equal(x.grad, y.grad) for x, y in zip(a, b))
