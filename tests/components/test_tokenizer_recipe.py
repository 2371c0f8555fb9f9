"""The tokenizer's training recipe: accumulated micro-batches make the same step as one batch
(quantizers learning once), the learning-rate schedule, clipping and the EMA of the weights."""

import math

import pytest
import torch

from components.config import TrainTokenizerConfig
from components.schedules import lr_factor
from components.tokenizers.training import build_step
from components.weight_ema import WeightEMA

CPU = torch.device("cpu")


def _steps(quantizer: dict, **options):
    """Two identical steps, one taking batches of 64 whole, one in two micro-batches of 32 (fp32)."""
    made = []
    for accum in (1, 2):
        cfg = TrainTokenizerConfig(
            channels=8, latent_dim=8, batch_size=64, grad_accum_steps=accum, quantizer=quantizer, **options
        )
        torch.manual_seed(1)
        made.append(build_step(cfg, 16, CPU, amp_dtype=None))
    return made


@pytest.mark.parametrize(
    "quantizer",
    [
        {"type": "vq", "codebook_size": 32, "restart_after_steps": 1},  # EMA, dead-code restart every step
        {"type": "residual", "codebook_size": 16, "shared_codebook": True},
        {"type": "gumbel", "codebook_size": 32},
    ],
    ids=["ema-vq", "residual", "gumbel"],
)
def test_two_micro_batches_of_32_make_the_step_of_one_batch_of_64(quantizer):
    whole, accumulated = _steps(quantizer, grad_clip=10.0)
    torch.manual_seed(0)
    first, second = (torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8) for _ in range(2))
    whole.step(first, 1)  # initialises the codebook from the first batch, then both start equal
    accumulated.load_state_dict(whole.state_dict())

    torch.manual_seed(5)  # the restart draws its rows from the RNG: the same draw in both
    parts_whole = whole.step(second, 2)
    torch.manual_seed(5)
    parts_accumulated = accumulated.step(second, 2)

    assert parts_whole["loss"].item() == pytest.approx(parts_accumulated["loss"].item(), rel=1e-5)
    grads = {n: p.grad for n, p in whole.model.named_parameters()}
    for name, p in accumulated.model.named_parameters():
        assert torch.allclose(p.grad, grads[name], rtol=1e-4, atol=1e-6), name
    # EMA codebooks, their counts, the dead-code counters, Gumbel's clock: moved once, identically.
    buffers = dict(whole.model.named_buffers())
    for name, b in accumulated.model.named_buffers():
        assert torch.allclose(b.float(), buffers[name].float(), rtol=1e-5, atol=1e-6), name
    if quantizer["type"] == "gumbel":
        assert int(accumulated.model.quantizer.step) == 2


def test_an_exception_in_a_micro_batch_moves_no_codebook():
    _, accumulated = _steps({"type": "vq", "codebook_size": 32})
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    accumulated.step(images, 1)
    before = {k: v.clone() for k, v in accumulated.model.named_buffers()}
    calls = []

    def fail_second_micro_batch(module, inputs):  # after both have been quantized and kept
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the second micro-batch fails")

    accumulated.model.decoder.register_forward_pre_hook(fail_second_micro_batch)
    with pytest.raises(RuntimeError, match="second micro-batch"):
        accumulated.step(images, 2)
    for name, b in accumulated.model.named_buffers():
        assert torch.equal(b, before[name]), name
    assert accumulated.model.quantizer._deferred is None


def test_warmup_then_cosine_or_constant():
    cosine = lr_factor("cosine", steps=110, warmup_steps=10, min_ratio=0.1)
    assert [cosine(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cosine(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine(110) == pytest.approx(0.1) and cosine(500) == pytest.approx(0.1)
    constant = lr_factor("constant", steps=110, warmup_steps=4)
    assert [constant(s) for s in (0, 3, 4, 100)] == pytest.approx([0.25, 1.0, 1.0, 1.0])


def test_the_optimizers_follow_the_schedule_and_gradients_are_clipped():
    cfg = TrainTokenizerConfig(
        channels=8, latent_dim=8, batch_size=8, steps=20, lr=1e-3, lr_schedule="cosine", warmup_steps=4, grad_clip=1e-3
    )
    step = build_step(cfg, 16, CPU)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    parts = step.step(images, 1)
    assert step.opt_g.param_groups[0]["lr"] == pytest.approx(1e-3 / 4)
    assert parts["grad_norm"].item() > 1e-3  # the norm before clipping
    clipped = torch.norm(torch.stack([p.grad.norm() for p in step.model.parameters() if p.grad is not None]))
    assert clipped.item() == pytest.approx(1e-3, rel=1e-3)
    step.step(images, 20)  # the last step: 15/16 of the way down the cosine
    assert step.opt_g.param_groups[0]["lr"] == pytest.approx(1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * 15 / 16))))


def test_weight_ema_averages_parameters_and_copies_buffers():
    model = torch.nn.BatchNorm1d(3)
    ema = WeightEMA(model, decay=0.99)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.running_mean.fill_(5.0)
    ema.update(model)  # warm-up decay min(0.99, 1/10) = 0.1
    assert torch.allclose(ema.model.weight, torch.full((3,), 0.1 * 1.0 + 0.9 * 2.0))
    assert torch.equal(ema.model.running_mean, model.running_mean)
    assert ema.current_decay() == pytest.approx(2 / 11)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_the_weight_average_is_what_training_produces():
    cfg = TrainTokenizerConfig(channels=8, latent_dim=8, batch_size=8, weight_ema_decay=0.5)
    step = build_step(cfg, 16, CPU)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    for n in range(1, 4):
        step.step(images, n)
    assert step.trained_model is step.weight_ema.model
    live, averaged = step.model.decoder.net[-1].weight, step.trained_model.decoder.net[-1].weight
    assert not torch.equal(live, averaged)
    restored = build_step(cfg, 16, CPU)
    restored.load_state_dict(step.state_dict())
    assert restored.weight_ema.updates == 3
    assert torch.equal(restored.trained_model.decoder.net[-1].weight, averaged)
