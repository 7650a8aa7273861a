"""vq.py: nearest-code search, straight-through gradient, the official "legacy" loss weighting, usage statistics."""
import math

import pytest
import torch

from vq import VectorQuantizer

@pytest.fixture
def vq():
    torch.manual_seed(0)
    q = VectorQuantizer(n_codes=64, dim=8)
    torch.nn.init.normal_(q.embedding.weight)  # spread the codes out so that nearest neighbours are well separated
    return q

def test_nearest_is_brute_force_argmin(vq):
    z = torch.randn(3, 5, 8)
    brute = torch.cdist(z.reshape(-1, 8), vq.embedding.weight).argmin(1).view(3, 5)
    assert torch.equal(vq.nearest(z), brute)
    assert torch.equal(vq.nearest(vq.embedding.weight), torch.arange(64))  # every code is its own nearest code

def test_forward_value_and_straight_through_gradient(vq):
    z = torch.randn(2, 4, 8, requires_grad=True)
    z_q, codes, _ = vq(z)
    assert codes.shape == (2, 4) and codes.dtype == torch.long
    torch.testing.assert_close(z_q, vq.lookup(codes), rtol=0, atol=1e-6)
    w = torch.randn_like(z)
    (z_q * w).sum().backward()
    torch.testing.assert_close(z.grad, w)  # the gradient passes the quantizer unchanged

def test_loss_uses_the_official_legacy_weighting(vq):
    z = torch.randn(2, 4, 8, requires_grad=True)
    _, codes, loss = vq(z)
    e = vq.lookup(codes).detach()
    torch.testing.assert_close(loss, 1.25 * ((z - e) ** 2).mean())
    loss.backward()
    n = z.numel()
    # Commitment weight 1.0 reaches the encoder, codebook weight 0.25 reaches the codes.
    torch.testing.assert_close(z.grad, 2 * (z - e).detach() / n)
    expected = torch.zeros_like(vq.embedding.weight)
    expected.index_add_(0, codes.flatten(), (0.25 * 2 * (e - z.detach()) / n).reshape(-1, 8))
    torch.testing.assert_close(vq.embedding.weight.grad, expected)

def test_usage_and_perplexity(vq):
    used, ppl = vq.usage(torch.arange(64).repeat(3))
    assert used == 1.0 and ppl == pytest.approx(64)
    used, ppl = vq.usage(torch.full((100,), 7))
    assert used == 1 / 64 and ppl == pytest.approx(1.0)
    used, ppl = vq.usage(torch.tensor([0, 0, 1, 2]))  # p = (1/2, 1/4, 1/4)
    assert used == 3 / 64 and ppl == pytest.approx(math.exp(1.5 * math.log(2)))

def test_bad_inputs_are_named(vq):
    with pytest.raises(ValueError, match="size 8"):
        vq.nearest(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        vq.lookup(torch.tensor([0, 64]))
    with pytest.raises(ValueError, match="integer"):
        vq.lookup(torch.tensor([0.0]))
