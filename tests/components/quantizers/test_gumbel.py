import math

import torch

from components.quantizers import GumbelConfig


def test_temperature_anneals_from_start_to_end_and_stays():
    q = GumbelConfig(codebook_size=8, temperature_start=1.0, temperature_end=0.1, anneal_steps=10).build(4).train()
    seen = [q(torch.randn(1, 4, 4)).stats["temperature"].item() for _ in range(15)]
    assert seen[0] == 1.0 and math.isclose(seen[5], 0.1**0.5, rel_tol=1e-6)
    assert all(a > b for a, b in zip(seen[:10], seen[1:11], strict=True)) and seen[10:] == [seen[10]] * 5
    assert math.isclose(seen[10], 0.1, rel_tol=1e-6)
    assert int(q.state_dict()["step"]) == 15  # the schedule's clock is saved with the weights


def test_eval_takes_the_most_likely_code():
    q = GumbelConfig(codebook_size=8).build(4).eval()
    z = torch.randn(2, 6, 4)
    assert torch.equal(q(z).indices, q.to_logits(z).argmax(-1))


def test_kl_to_uniform_is_zero_for_uniform_logits():
    q = GumbelConfig(codebook_size=8, kl_weight=1.0).build(4).train()
    torch.nn.init.zeros_(q.to_logits.weight)
    torch.nn.init.zeros_(q.to_logits.bias)
    assert abs(q(torch.randn(2, 6, 4)).loss.item()) < 1e-6
    torch.nn.init.normal_(q.to_logits.weight, std=5.0)
    assert q(torch.randn(2, 6, 4)).loss.item() > 0.1
