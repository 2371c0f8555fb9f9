"""The codebook options from the literature: the rotation trick, dead-code replacement by an
EMA-count threshold, SimVQ's frozen codes behind a learned map, LlamaGen's entropy loss."""

from __future__ import annotations

import math

import pytest
import torch

from components.config import ConfigError, parse_params
from components.quantizers.base import rotation_to, straight_through
from components.quantizers.vq import VQConfig


def test_rotation_trick_gradient_on_a_hand_made_case():
    # e = (1, 0) lies on the x axis, its code q = (0, 2) on the y axis: R is the rotation by
    # +90 degrees, |q| / |e| = 2. A gradient g at q reaches e as 2 R^T g.
    e = torch.tensor([[1.0, 0.0]], requires_grad=True)
    q = torch.tensor([[0.0, 2.0]])
    out = straight_through(e, q, rotate=True)
    assert torch.equal(out, q)  # the forward value is the code itself
    out.backward(torch.tensor([[0.0, 1.0]]))  # along q
    assert torch.allclose(e.grad, torch.tensor([[2.0, 0.0]]), atol=1e-6)  # along e, twice as long
    e.grad = None
    straight_through(e, q, rotate=True).backward(torch.tensor([[-1.0, 0.0]]))
    # R^T (-1, 0) = (0, 1): a gradient at right angles to q stays at right angles to e.
    assert torch.allclose(e.grad, torch.tensor([[0.0, 2.0]]), atol=1e-6)


def test_rotation_trick_keeps_angles_and_scales_norms_in_general():
    torch.manual_seed(0)
    e = torch.randn(64, 8, requires_grad=True)
    q = torch.randn(64, 8)
    g = torch.randn(64, 8)
    rotated = rotation_to(e, q)
    assert torch.allclose(rotated, q, atol=1e-5)
    straight_through(e, q, rotate=True).backward(g)
    ratio = q.norm(dim=1) / e.detach().norm(dim=1)
    # |grad_e| = |q| / |e| |g| (a rotation keeps norms) ...
    assert torch.allclose(e.grad.norm(dim=1), ratio * g.norm(dim=1), rtol=1e-4)
    # ... and the angle between grad_e and e is the angle between g and q.
    cos_e = torch.cosine_similarity(e.grad, e.detach(), dim=1)
    cos_q = torch.cosine_similarity(g, q, dim=1)
    assert torch.allclose(cos_e, cos_q, atol=1e-4)


def test_straight_through_without_rotation_copies_the_gradient():
    e = torch.randn(4, 3, requires_grad=True)
    q = torch.randn(4, 3)
    g = torch.randn(4, 3)
    straight_through(e, q).backward(g)
    assert torch.equal(e.grad, g)


def test_vq_with_rotation_trick_outputs_codes_and_reaches_the_encoder():
    torch.manual_seed(0)
    vq = VQConfig(codebook_size=8, rotation_trick=True, decay=0.5).build(4).train()
    z = torch.randn(2, 5, 4, requires_grad=True)
    vq(z)
    out = vq.eval()(z)
    assert torch.equal(out.quantized, vq.indices_to_codes(out.indices))
    out = vq.train()(z)
    out.quantized.square().sum().backward()
    assert z.grad.abs().sum() > 0


def test_rare_codes_are_replaced_by_ema_count_threshold():
    torch.manual_seed(0)
    vq = VQConfig(codebook_size=8, restart_after_steps=0, kmeans_iters=0, dead_code_threshold=2.0).build(2).train()
    vq(torch.randn(1, 256, 2))
    # Five codes far from every input: chosen by no row, their EMA counts decay below 2.
    vq.codebook[3:] = 100.0
    vq.embed_sum[3:] = 100.0 * vq.cluster_size[3:].unsqueeze(1)
    vq.cluster_size[3:] = 2.5
    z = torch.randn(1, 256, 2)
    vq(z)  # counts 2.5 * 0.99 = 2.475: still above the threshold, kept where they are
    assert (vq.codebook[3:] > 50).all()
    vq.cluster_size[3:] = 2.01  # next update: 1.99 < 2
    vq(z)
    # Replaced at once (no 100-step wait), each by a distinct input row, as a cluster of 2.
    assert vq.codebook.abs().max() < 10
    rows = z.view(-1, 2)
    for code in vq.codebook[3:]:
        assert (rows == code).all(dim=1).any()
    assert len({tuple(c.tolist()) for c in vq.codebook[3:]}) == 5
    assert torch.allclose(vq.cluster_size[3:], torch.full((5,), 2.0))
    assert torch.allclose(vq.embed_sum[3:], vq.codebook[3:] * 2.0)
    # A code used often enough is never touched.
    vq.cluster_size[:3] = 50.0
    vq(z)
    assert vq.cluster_size[:3].min() > 2.0


def test_threshold_with_more_rare_codes_than_rows_replaces_as_many_as_rows():
    torch.manual_seed(0)
    vq = VQConfig(codebook_size=64, kmeans_iters=0, restart_after_steps=0, dead_code_threshold=1.0).build(2).train()
    vq(torch.randn(1, 10, 2))  # the first batch seeds the codes (from its own rows)
    z = torch.randn(1, 10, 2)
    vq(z)
    # 64 codes expect under one row each: all are rare, and each of the step's 10 rows seeds one.
    rows = {tuple(r.tolist()) for r in z.view(-1, 2)}
    seeded = [tuple(c.tolist()) in rows for c in vq.codebook]
    assert sum(seeded) == 10
    assert torch.equal(vq.cluster_size[torch.tensor(seeded)], torch.ones(10))


def test_simvq_learns_only_the_map_and_its_codes_follow():
    torch.manual_seed(0)
    vq = VQConfig(codebook_size=16, ema=False, simvq=True).build(4).train()
    assert [n for n, _ in vq.named_parameters()] == ["code_map.weight"]
    z = torch.randn(2, 32, 4)
    out = vq(z)  # k-means seeds the frozen basis; the map starts as the identity
    basis = vq.codebook.clone()
    out.loss.backward()
    assert vq.code_map.weight.grad.abs().sum() > 0
    with torch.no_grad():
        vq.code_map.weight.mul_(2.0)
    assert torch.equal(vq.codebook, basis)
    assert torch.allclose(vq.code_vectors(), 2.0 * basis)
    indices = vq(z).indices
    assert torch.allclose(vq.indices_to_codes(indices), 2.0 * basis[indices])


def test_simvq_restart_puts_the_vector_itself_in_the_codebook():
    torch.manual_seed(0)
    vq = VQConfig(codebook_size=4, ema=False, simvq=True, kmeans_iters=0).build(2).train()
    vq(torch.randn(1, 8, 2))
    with torch.no_grad():
        vq.code_map.weight.copy_(torch.tensor([[2.0, 1.0], [0.0, 3.0]]))
    target = torch.tensor([[0.5, -1.5]])
    vq._set_codes(torch.tensor([1]), target, torch.ones(1))
    assert torch.allclose(vq.code_vectors()[1], target[0], atol=1e-5)


def test_entropy_loss_is_low_for_confident_spread_assignments():
    torch.manual_seed(0)
    vq = (
        VQConfig(
            codebook_size=4, entropy_loss_weight=1.0, entropy_temperature=1.0, kmeans_iters=0, restart_after_steps=0
        )
        .build(2)
        .train()
    )
    vq.codebook.copy_(torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0], [0.0, -4.0]]))
    spread = vq.codebook.repeat(8, 1)  # every row on a code, all codes used equally
    collapsed = vq.codebook[:1].repeat(32, 1)  # every row on code 0
    assert vq.entropy_loss(spread).item() == pytest.approx(-math.log(4), abs=1e-4)
    assert vq.entropy_loss(collapsed).item() == pytest.approx(0.0, abs=1e-4)
    h = (spread + 0.5 * torch.randn_like(spread)).requires_grad_()
    vq.entropy_loss(h).backward()
    assert h.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"ema": False, "dead_code_threshold": 1.0}, "dead_code_threshold"),
        ({"simvq": True}, "simvq"),
    ],
)
def test_options_that_need_the_other_codebook_kind_fail_at_config_load(options, key):
    raw = {"train_tokenizer": {"quantizer": {"type": "vq", **options}}}
    with pytest.raises(ConfigError, match=f"quantizer.{key}"):
        parse_params(raw)
