import copy
import itertools

import torch

from components.quantizers import ProductConfig, ResidualConfig, nearest_codes


def test_product_groups_quantize_their_own_slices():
    pq = ProductConfig(codebook_size=8, groups=3).build(6).train()
    pq(torch.randn(2, 32, 6))
    pq.eval()
    z = torch.randn(2, 5, 6)
    out = pq(z)
    assert out.indices.shape == (2, 5, 3) and pq.token_names == ("group0", "group1", "group2")
    for g, book in enumerate(pq.codebooks):
        expected = nearest_codes(z[..., 2 * g : 2 * g + 2].reshape(-1, 2), book.codebook)
        assert torch.equal(out.indices[..., g].reshape(-1), expected)


def _trained_residual(shared: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    rq = ResidualConfig(codebook_size=16, stages=4, shared_codebook=shared).build(4).train()
    for _ in range(30):
        rq(torch.randn(4, 64, 4))
    return rq.eval()


def test_residual_error_shrinks_with_each_stage():
    for shared in (False, True):
        rq = _trained_residual(shared)
        z = torch.randn(8, 64, 4)
        indices = rq(z).indices
        errors = [(rq.indices_to_codes(indices, stages=s) - z).pow(2).mean().item() for s in range(1, 5)]
        assert all(a > b for a, b in itertools.pairwise(errors)), (shared, errors)
        assert errors[-1] < 0.5 * errors[0]


def test_shared_codebook_is_one_codebook():
    shared = ResidualConfig(codebook_size=16, stages=3, shared_codebook=True).build(4)
    separate = ResidualConfig(codebook_size=16, stages=3).build(4)
    assert len(shared.codebooks) == 1 and len(separate.codebooks) == 3
    assert shared.token_names == ("stage0", "stage1", "stage2")
    assert all(shared.book(s) is shared.codebooks[0] for s in range(3))


def test_quantizer_dropout_keeps_a_prefix_of_the_stages_per_sample():
    rq = _trained_residual(shared=False)
    rq.dropout = 1.0
    rq.train()
    torch.manual_seed(1)
    z = torch.randn(64, 5, 4)
    before = copy.deepcopy(rq)  # the codes of this step (EMA moves them after it)
    out = rq(z)
    kept = []
    for b in range(64):
        matches = [
            s
            for s in range(1, 5)
            if torch.equal(before.indices_to_codes(out.indices[b : b + 1], stages=s), out.quantized[b : b + 1])
        ]
        assert matches, f"sample {b} is not the sum of a prefix of its stages"
        kept.append(matches[0])
    assert set(kept) == {1, 2, 3, 4}
    rq.eval()
    assert torch.equal(rq.indices_to_codes(rq(z).indices), rq(z).quantized)  # eval: every stage
