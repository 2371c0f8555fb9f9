"""Muon + AdamW as one optimizer: the orthogonalisation, the groups, known updates, resuming."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from components.optim import MuonAdamW, muon_groups, orthogonalise


class _Tiny(nn.Module):
    """Names like the priors': embeddings, blocks with linear layers, a head (optionally tied)."""

    def __init__(self, tie: bool = False):
        super().__init__()
        self.tok_emb = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 24), nn.GELU(), nn.Linear(24, 8)) for _ in range(2)])
        self.ln_f = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10, bias=False)
        if tie:
            self.head.weight = self.tok_emb.weight

    def forward(self, idx):
        x = self.tok_emb(idx)
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.ln_f(x))


@pytest.mark.parametrize("shape", [(16, 16), (48, 16), (16, 48)])
def test_orthogonalise_takes_every_singular_value_near_one(shape):
    torch.manual_seed(0)
    # A lopsided spectrum (singular values from 0.1 to 10): Adam would follow the large ones.
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
    k = min(shape)
    s = torch.logspace(-1, 1, k)
    g = u[:, :k] @ torch.diag(s) @ v[:, :k].T
    o = orthogonalise(g)
    assert o.shape == g.shape
    sv = torch.linalg.svdvals(o)
    assert sv.max() < 1.25 and sv.min() > 0.6
    # The same singular vectors: O is close to U V^T in direction.
    polar = u[:, :k] @ v[:, :k].T
    assert torch.nn.functional.cosine_similarity(o.flatten(), polar.flatten(), dim=0) > 0.97
    assert torch.equal(orthogonalise(torch.zeros(shape)), torch.zeros(shape))


def test_a_stack_is_orthogonalised_matrix_by_matrix_and_bf16_keeps_the_direction():
    torch.manual_seed(0)
    stack = torch.randn(3, 24, 8)
    batched = orthogonalise(stack)
    for i in range(3):
        torch.testing.assert_close(batched[i], orthogonalise(stack[i]))
    low = orthogonalise(stack, dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    assert (low.float() - batched).norm() / batched.norm() < 0.05


def test_groups_put_the_blocks_matrices_under_muon_and_list_a_tied_head_once():
    model = _Tiny(tie=True)
    groups = muon_groups(model, muon_lr=0.02, lr=1e-3, weight_decay=0.1)
    muon = {id(p) for g in groups if g["muon"] for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon}
    assert names == {"blocks.0.0.weight", "blocks.0.2.weight", "blocks.1.0.weight", "blocks.1.2.weight"}
    listed = [p for g in groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed}) == len(list(model.parameters()))
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.tok_emb.weight) not in decayed and id(model.ln_f.weight) not in decayed


def test_the_adamw_groups_step_as_torch_adamw():
    torch.manual_seed(0)
    model = _Tiny()
    model.blocks.requires_grad_(False)  # Muon's part held still, so both see the same forward
    reference = copy.deepcopy(model)
    ours = MuonAdamW(muon_groups(model, 0.02, 1e-2, 0.1), betas=(0.9, 0.95))
    theirs_groups = muon_groups(reference, 0.02, 1e-2, 0.1)
    assert not any(g["muon"] for g in theirs_groups)
    theirs = torch.optim.AdamW(theirs_groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    idx = torch.randint(0, 10, (4, 5))
    for _ in range(3):
        for m, opt in ((model, ours), (reference, theirs)):
            opt.zero_grad()
            m(idx).logsumexp(-1).mean().backward()
            opt.step()
    torch.testing.assert_close(model.head.weight, reference.head.weight)
    torch.testing.assert_close(model.ln_f.bias, reference.ln_f.bias)
    torch.testing.assert_close(model.tok_emb.weight, reference.tok_emb.weight)


def test_a_muon_step_is_the_orthogonalised_nesterov_momentum():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(24, 8))
    opt = MuonAdamW([{"params": [w], "muon": True, "lr": 0.1, "weight_decay": 0.5}], momentum=0.9)
    before = w.detach().clone()
    grads = [torch.randn(24, 8), torch.randn(24, 8)]
    buffer = torch.zeros(24, 8)
    expected = before
    for g in grads:
        w.grad = g.clone()
        opt.step()
        buffer = 0.9 * buffer + g
        update = orthogonalise(g + 0.9 * buffer)
        expected = expected * (1 - 0.1 * 0.5) - 0.1 * (24 / 8) ** 0.5 * update
    torch.testing.assert_close(w.detach(), expected)
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([{"params": [nn.Parameter(torch.zeros(3))], "muon": True, "lr": 0.1, "weight_decay": 0.0}])


def test_a_resumed_optimizer_continues_exactly_and_a_schedule_scales_both_rules():
    torch.manual_seed(0)
    idx = torch.randint(0, 10, (4, 5))

    def run(model, opt, sched, steps):
        for _ in range(steps):
            opt.zero_grad()
            model(idx).logsumexp(-1).mean().backward()
            opt.step()
            sched.step()

    def make(model):
        opt = MuonAdamW(muon_groups(model, 0.02, 1e-2, 0.01))
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)

    straight = _Tiny()
    resumed = copy.deepcopy(straight)
    opt, sched = make(straight)
    run(straight, opt, sched, 4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02 / 16, 1e-2 / 16, 1e-2 / 16])

    opt2, sched2 = make(resumed)
    run(resumed, opt2, sched2, 2)
    state = copy.deepcopy((resumed.state_dict(), opt2.state_dict(), sched2.state_dict()))
    fresh = _Tiny()
    fresh.load_state_dict(state[0])
    opt3, sched3 = make(fresh)
    opt3.load_state_dict(state[1])
    sched3.load_state_dict(state[2])
    run(fresh, opt3, sched3, 2)
    for a, b in zip(straight.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
