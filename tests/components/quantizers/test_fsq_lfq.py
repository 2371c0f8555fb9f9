import math

import torch
import torch.nn.functional as F

from components.quantizers import FSQConfig, LFQConfig


def test_fsq_index_code_bijection_over_the_whole_codebook():
    levels = [2, 3, 4, 5]
    fsq = FSQConfig(levels=levels).build(len(levels)).eval()
    assert fsq.codebook_size == 120 and not list(fsq.parameters())
    every = torch.arange(120)
    codes = fsq.indices_to_codes(every)
    assert len({tuple(c.tolist()) for c in codes}) == 120
    assert codes.abs().max() <= 1
    # A latent that the bounding maps onto each code's grid point quantizes back to its index.
    half = (fsq.levels.float() - 1) * (1 + fsq.eps) / 2
    offset = torch.where(fsq.levels % 2 == 0, 0.5, 0.0)
    latent = torch.atanh((codes * fsq.half_width + offset) / half) - torch.atanh(offset / half)
    out = fsq(latent.view(1, 120, 4))
    assert torch.equal(out.indices[0], every)
    assert torch.allclose(out.quantized[0], codes)


def test_fsq_levels_per_channel():
    fsq = FSQConfig(levels=[3, 4]).build(2).eval()
    digits = fsq.indices_to_digits(fsq(torch.randn(1, 5000, 2) * 3).indices.view(-1))
    assert digits[:, 0].unique().tolist() == [0, 1, 2] and digits[:, 1].unique().tolist() == [0, 1, 2, 3]


def test_lfq_index_code_bijection_over_the_whole_codebook():
    lfq = LFQConfig(codebook_size=64).build(6).eval()
    every = torch.arange(64)
    codes = lfq.indices_to_codes(every)
    assert set(codes.unique().tolist()) == {-1.0, 1.0}
    assert len({tuple(c.tolist()) for c in codes}) == 64
    assert torch.equal(lfq(codes.view(1, 64, 6)).indices[0], every)
    # Channel 0 is the most significant bit.
    assert lfq(torch.tensor([[[1.0, -1, -1, -1, -1, -1]]])).indices.item() == 32


def _brute_force_entropy_loss(h: torch.Tensor, temperature: float, diversity: float) -> torch.Tensor:
    bits = h.shape[1]
    codes = ((torch.arange(2**bits).unsqueeze(1) >> torch.arange(bits - 1, -1, -1)) & 1).float() * 2 - 1
    probs = F.softmax(-torch.cdist(h, codes).pow(2) / temperature, dim=1)  # (n, 2^bits)
    per_sample = -(probs * probs.clamp(min=1e-12).log()).sum(1).mean()
    mean = probs.mean(0)
    return per_sample - diversity * -(mean * mean.clamp(min=1e-12).log()).sum()


def test_lfq_factorised_entropy_equals_the_full_one_within_a_group():
    torch.manual_seed(0)
    h = torch.randn(50, 6) * 0.3
    for temperature in (0.5, 2.0):
        exact = LFQConfig(codebook_size=64, entropy_temperature=temperature, entropy_group_bits=6).build(6)
        assert torch.allclose(exact.entropy_loss(h), _brute_force_entropy_loss(h, temperature, 1.0), atol=1e-4)
        # Groups of 2 bits: the per-sample part stays exact, the batch part becomes the sum of
        # the groups' entropies, which is at least the joint entropy.
        grouped = LFQConfig(codebook_size=64, entropy_temperature=temperature, entropy_group_bits=2).build(6)
        assert grouped.entropy_loss(h) <= exact.entropy_loss(h) + 1e-5


def test_lfq_entropy_loss_never_materialises_the_codebook():
    """2^18 codes, 8192 rows: n x 2^18 floats would be 8 GiB; the groups need 32 MiB."""
    lfq = LFQConfig(codebook_size=2**18).build(18).train()
    z = torch.randn(8, 32, 32, 18, requires_grad=True)
    out = lfq(z)
    out.loss.backward()
    assert torch.isfinite(z.grad).all() and out.indices.max() < 2**18
    assert math.isfinite(out.loss.item())
