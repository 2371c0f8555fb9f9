"""The interface every registered quantizer keeps: codes round-trip, straight-through gradients,
indices in range, deterministic eval, refusal of non-finite inputs."""

import copy

import pytest
import torch

from components.quantizers import QUANTIZERS

DIM = 8
# One config per type (and per codebook-learning mode where they differ).
CONFIGS = {
    "vq": {"type": "vq", "codebook_size": 16},
    "vq-gradient": {"type": "vq", "codebook_size": 16, "ema": False},
    "vq-cosine-lowdim": {"type": "vq", "codebook_size": 16, "cosine": True, "codebook_dim": 4},
    "gumbel": {"type": "gumbel", "codebook_size": 16},
    "product": {"type": "product", "codebook_size": 16, "groups": 2},
    "residual": {"type": "residual", "codebook_size": 16, "stages": 3},
    "residual-shared-lowdim": {
        "type": "residual",
        "codebook_size": 16,
        "stages": 2,
        "shared_codebook": True,
        "codebook_dim": 4,
    },
    "fsq": {"type": "fsq", "levels": [4, 3, 5]},
    "lfq": {"type": "lfq", "codebook_size": 64},
}


def _build(name: str):
    raw = CONFIGS[name]
    return QUANTIZERS[raw["type"]].model_validate(raw).build(DIM)


def _expected_index_shape(q, z):
    m = q.tokens_per_position
    return z.shape[:-1] if m == 1 else (*z.shape[:-1], m)


@pytest.fixture(params=sorted(CONFIGS))
def name(request):
    return request.param


@pytest.mark.parametrize("shape", [(2, 3, 5, DIM), (3, 7, DIM)])
def test_indices_to_codes_gives_the_quantized_values(name, shape):
    torch.manual_seed(0)
    q = _build(name).train()
    q(torch.randn(*shape))  # first step initialises data-dependent codebooks
    before = copy.deepcopy(q)  # EMA codebooks move after a training step: compare to the codes used
    z = torch.randn(*shape)
    out = q(z)
    assert out.indices.shape == _expected_index_shape(q, z) and out.indices.dtype == q.index_dtype == torch.int64
    assert ((out.indices >= 0) & (out.indices < q.codebook_size)).all()
    assert torch.equal(before.indices_to_codes(out.indices), out.quantized)
    q.eval()
    out = q(z)
    assert torch.equal(q.indices_to_codes(out.indices), out.quantized)
    assert set(out.stats) >= {"codebook_usage", "perplexity"}


def test_gradients_reach_the_input(name):
    torch.manual_seed(0)
    q = _build(name).train()
    z = torch.randn(2, 4, 4, DIM, requires_grad=True)
    out = q(z)
    upstream = torch.randn_like(out.quantized)
    ((out.quantized * upstream).sum() + out.loss).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    trainable = [p for p in q.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable), [n for n, p in q.named_parameters() if p.grad is None]


def test_eval_is_deterministic_and_changes_nothing(name):
    torch.manual_seed(0)
    q = _build(name).train()
    q(torch.randn(2, 4, 4, DIM))
    q.eval()
    state = copy.deepcopy(q.state_dict())
    z = torch.randn(2, 4, 4, DIM)
    first, second = q(z), q(z)
    assert torch.equal(first.indices, second.indices) and torch.equal(first.quantized, second.quantized)
    assert all(torch.equal(state[k], v) for k, v in q.state_dict().items())


def test_non_finite_encoder_output_stops_training(name):
    q = _build(name).train()
    z = torch.randn(2, 4, 4, DIM)
    z[1, 2, 3, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite"):
        q(z)


def test_wrong_width_is_refused(name):
    with pytest.raises(ValueError, match=f"expected input .*{DIM}"):
        _build(name)(torch.randn(2, 4, DIM + 1))


def test_every_registered_type_is_covered():
    assert {raw["type"] for raw in CONFIGS.values()} == set(QUANTIZERS)
