"""The MaskGIT prior: its mask schedule, parallel decoding, given tokens, guidance schedules,
a known distribution learned, its export."""

import math

import pytest
import torch

from components.config import ConfigError, parse_params
from components.metrics import PriorBits
from components.priors import (
    MaskGITPrior,
    PriorConfig,
    Sampler,
    SamplingOptions,
    TransformerPrior,
    build_prior,
    load_prior,
    save_prior,
)
from components.priors.maskgit import mask_ratio, random_masks, still_hidden


def _maskgit(num_classes=3, vocab=11, layout=((4, 4, 1),), n_embd=16) -> MaskGITPrior:
    torch.manual_seed(0)
    length = sum(h * w * m for h, w, m in layout)
    cfg = PriorConfig(
        vocab_size=vocab, seq_len=length, num_classes=num_classes, n_layer=2, n_head=2, n_embd=n_embd, layout=layout
    )
    return MaskGITPrior(PriorConfig(**{**cfg.__dict__, "kind": "maskgit"})).eval()


def _ar(num_classes=3) -> TransformerPrior:
    torch.manual_seed(0)
    return TransformerPrior(
        PriorConfig(
            vocab_size=11, seq_len=16, num_classes=num_classes, n_layer=2, n_head=2, n_embd=16, layout=((4, 4, 1),)
        )
    ).eval()


def _draw(model, n, labels=None, seed=0, given=None, **options):
    return Sampler(model, SamplingOptions(**options), torch.Generator().manual_seed(seed)).draw(n, labels, given=given)


def test_cosine_mask_schedule():
    assert mask_ratio(0.0) == 1.0 and abs(float(mask_ratio(1.0))) < 1e-12
    assert math.isclose(float(mask_ratio(0.5)), math.cos(math.pi / 4))
    # Decoding 16 free positions in 8 steps: floor(16 cos(pi/2 k/8)) stay hidden after step k-1.
    counts = [int(still_hidden(torch.tensor([16]), step, 8)) for step in range(8)]
    assert counts == [15, 14, 13, 11, 8, 6, 3, 0]
    # Training masks: per row ceil(L cos(pi/2 u)) hidden, u ~ U(0, 1): the mean share is 2/pi.
    masks = random_masks(20000, 256, torch.Generator().manual_seed(0))
    share = masks.float().mean(dim=1)
    assert (masks.sum(dim=1) >= 1).all()
    assert abs(share.mean().item() - 2 / math.pi) < 0.01
    # Its distribution: P(share <= r) = 1 - (2/pi) acos(r).
    for r in (0.25, 0.5, 0.9):
        expected = 1 - 2 / math.pi * math.acos(r)
        assert abs((share <= r).float().mean().item() - expected) < 0.015, r


def test_decoding_fills_every_position_in_exactly_t_steps():
    model = _maskgit()
    hidden_per_call = []
    forward_ids = model.forward_ids

    def counting(ids):
        hidden_per_call.append((ids[:, 1:] == model.mask_token).sum(dim=1).tolist())
        return forward_ids(ids)

    model.forward_ids = counting
    tokens = _draw(model, 3, torch.tensor([0, 1, 2]), decode_steps=8, guidance_scale=2.0)
    assert tokens.shape == (3, 16) and ((tokens >= 0) & (tokens < 11)).all()
    # 8 forward passes (each of 2 x 3 rows: guided); hidden before each: all 16, then the schedule.
    assert [row[0] for row in hidden_per_call] == [16, 15, 14, 13, 11, 8, 6, 3]
    assert all(len(row) == 6 for row in hidden_per_call)


def test_given_tokens_are_never_changed():
    gen = torch.Generator().manual_seed(1)
    given = torch.randint(0, 11, (4, 16), generator=gen)
    given[torch.rand(4, 16, generator=gen) < 0.6] = -1
    for model in (_maskgit(), _ar()):
        for options in ({}, {"guidance_scale": 3.0, "temperature": 1.5}):
            out = _draw(model, 4, torch.tensor([0, 1, 2, -1]), given=given, decode_steps=5, **options)
            keep = given >= 0
            assert torch.equal(out[keep], given[keep]), type(model).__name__
    with pytest.raises(ValueError, match="not a code"):
        _draw(_maskgit(), 1, given=torch.full((1, 16), 11))
    with pytest.raises(ValueError, match=r"\(2, 16\)"):
        _draw(_maskgit(), 2, given=torch.full((1, 16), -1))


def test_given_tokens_are_context_for_maskgit():
    """Every position hidden but one given: the first step's logits change with the given token."""
    model = _maskgit(num_classes=0)
    hidden = torch.ones(2, 16, dtype=torch.bool)
    hidden[:, 5] = False
    tokens = torch.zeros(2, 16, dtype=torch.long)
    tokens[1, 5] = 7
    logits = model(tokens, None, hidden)
    assert not torch.allclose(logits[0], logits[1])


@pytest.mark.parametrize("make", [_maskgit, _ar], ids=["maskgit", "ar"])
def test_guidance_at_scale_one_is_conditional_sampling(make, monkeypatch):
    model = make()
    labels = torch.tensor([0, 1, 2, 0])
    plain = _draw(model, 4, labels, seed=5, temperature=1.3)
    # The guided path (conditional and unconditional rows, u + 1 (c - u)) at scale 1.
    monkeypatch.setattr(SamplingOptions, "guided", property(lambda self: True))
    forced = _draw(model, 4, labels, seed=5, temperature=1.3)
    assert torch.equal(plain, forced)


def test_linear_guidance_ramps_from_one_to_the_scale():
    options = SamplingOptions(guidance_scale=3.0, guidance_schedule="linear")
    assert [options.scale_at(i, 5) for i in range(5)] == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert SamplingOptions(guidance_scale=3.0).scale_at(0, 5) == 3.0
    # The first token of a linear ramp is drawn at scale 1: as plain conditional sampling's.
    model, labels = _ar(), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():  # classes (and the null token) that move the logits, as trained ones do
        model.tok_emb.weight[11:15].normal_(std=3.0)
    plain = _draw(model, 6, labels, seed=2)
    ramped = _draw(model, 6, labels, seed=2, guidance_scale=3.0, guidance_schedule="linear")
    constant = _draw(model, 6, labels, seed=2, guidance_scale=3.0)
    assert torch.equal(plain[:, 0], ramped[:, 0])
    assert not torch.equal(ramped, constant)
    with pytest.raises(ValueError, match="guidance_schedule"):
        SamplingOptions(guidance_schedule="cosine")


STEPS = 800


def test_maskgit_learns_a_known_joint_distribution():
    """Four tokens of 4 codes: x0 and x2 uniform and independent, x1 = x0, x3 = x2 + 1 mod 4.
    After training, one position hidden at a time the model puts >= 0.95 on the right code;
    everything hidden its marginals are uniform within 0.05; decoded samples keep both
    dependences (>= 0.97) with uniform marginals (within 0.05)."""
    gen = torch.Generator().manual_seed(0)

    def data(n):
        x0, x2 = torch.randint(0, 4, (n,), generator=gen), torch.randint(0, 4, (n,), generator=gen)
        return torch.stack([x0, x0, x2, (x2 + 1) % 4], dim=1)

    model = _maskgit(num_classes=0, vocab=4, layout=((2, 2, 1),), n_embd=32).train()
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(STEPS):
        batch = data(128)
        loss = model.loss(batch, None, random_masks(128, 4, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    test = data(500)
    with torch.no_grad():
        for hidden_pos in range(4):  # each is determined by its partner
            hidden = torch.zeros(500, 4, dtype=torch.bool)
            hidden[:, hidden_pos] = True
            probs = model(test, None, hidden)[:, hidden_pos].softmax(-1)
            right = probs.gather(1, test[:, hidden_pos : hidden_pos + 1])[:, 0]
            assert right.mean() > 0.95, (hidden_pos, right.mean())
        marginal = model(test[:1], None, torch.ones(1, 4, dtype=torch.bool))[0].softmax(-1)
        assert (marginal - 0.25).abs().max() < 0.05, marginal
    samples = _draw(model, 2000, decode_steps=4, seed=3)
    assert (samples[:, 1] == samples[:, 0]).float().mean() >= 0.97
    assert (samples[:, 3] == (samples[:, 2] + 1) % 4).float().mean() >= 0.97
    for pos in (0, 2):
        freq = torch.bincount(samples[:, pos], minlength=4).float() / 2000
        assert (freq - 0.25).abs().max() < 0.05, (pos, freq)


def test_masked_bits_do_not_depend_on_batching():
    model = _maskgit()
    tokens, labels = torch.randint(0, 11, (10, 16)), torch.tensor([0, 1, 2, -1, 0, 1, 2, -1, 0, 1])
    whole = PriorBits(model)
    whole.add(tokens, labels)
    pieces = PriorBits(model)
    for i in range(0, 10, 3):
        pieces.add(tokens[i : i + 3], labels[i : i + 3])
    assert math.isclose(whole.bits, pieces.bits, rel_tol=1e-5)
    assert 2.5 < whole.bits < 4.5  # about log2(11) = 3.46 bits for an untrained model


class _Tokenizer:
    """One tier of 3x3 positions with 2 tokens each (product quantizer)."""

    fingerprint, tiers, num_tokens, codebook_size = "f" * 64, ("tokens",), 18, 7
    column_grids = {"tokens_0": (3, 3), "tokens_1": (3, 3)}
    column_codebook_sizes = {"tokens_0": 7, "tokens_1": 7}

    def tier_columns(self, tier):
        return ["tokens_0", "tokens_1"]

    def tier_grid(self, tier):
        return (3, 3)


def test_maskgit_export_round_trip_and_refusals(tmp_path):
    tok = _Tokenizer()
    model = build_prior(tok, num_classes=2, kind="maskgit", n_layer=1, n_head=2, n_embd=16)
    assert isinstance(model, MaskGITPrior) and model.cfg.layout == ((3, 3, 2),)
    save_prior(tmp_path, model, tokenizer_fingerprint=tok.fingerprint, grid=tok.column_grids, class_names=["a", "b"])
    loaded, meta = load_prior(tmp_path, tokenizer=tok)
    assert isinstance(loaded, MaskGITPrior) and meta["model"]["kind"] == "maskgit"
    tokens, hidden = torch.randint(0, 7, (3, 18)), random_masks(3, 18, torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, -1])
    assert torch.allclose(loaded.loss(tokens, labels, hidden), model.eval().loss(tokens, labels, hidden))
    # An AR prior's config reads as it did before kinds existed (no `kind` key).
    assert "kind" not in build_prior(tok, n_layer=1, n_head=2, n_embd=16).cfg.to_dict()

    class TwoTiers(_Tokenizer):
        tiers = ("top", "bottom")

    with pytest.raises(ValueError, match="one token tier"):
        build_prior(TwoTiers(), kind="maskgit", n_layer=1, n_head=2, n_embd=16)
    with pytest.raises(ConfigError, match="train_prior.kind: maskgit models one token tier"):
        parse_params({"train_tokenizer": {"arch": "vqvae2"}, "train_prior": {"kind": "maskgit"}})
    assert parse_params({"train_prior": {"kind": "maskgit"}}).train_prior.kind == "maskgit"
