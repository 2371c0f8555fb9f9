import pytest
import torch

from components.priors import (
    PriorConfig,
    Sampler,
    SamplingOptions,
    TransformerPrior,
    filter_logits,
    load_prior,
    sample,
    save_prior,
)
from components.priors.export import PriorMismatch


def _prior(num_classes=3) -> TransformerPrior:
    torch.manual_seed(0)
    return TransformerPrior(
        PriorConfig(vocab_size=11, seq_len=9, num_classes=num_classes, n_layer=2, n_head=2, n_embd=16)
    ).eval()


def test_kv_cache_gives_the_logits_of_full_recomputation():
    model = _prior()
    idx = torch.cat([model.cond_tokens(torch.tensor([0, 2]), 2, "cpu"), torch.randint(0, 11, (2, 8))], dim=1)
    full, _ = model.forward_tokens(idx)
    cache, steps = None, []
    for i in range(idx.shape[1]):
        logits, cache = model.forward_tokens(idx[:, i : i + 1], start=i, cache=cache)
        steps.append(logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    # A multi-token chunk on top of a cache (prefill then decode) agrees too.
    head, cache = model.forward_tokens(idx[:, :4])
    tail, _ = model.forward_tokens(idx[:, 4:], start=4, cache=cache)
    assert torch.allclose(torch.cat([head, tail], dim=1), full, atol=1e-5)


def _sample(model, n, labels=None, seed=0, use_cache=True, **options):
    generator = torch.Generator().manual_seed(seed)
    return Sampler(model, SamplingOptions(**options), generator, use_cache=use_cache).draw(n, labels)


def test_cached_sampling_equals_uncached_token_for_token():
    model = _prior()
    labels = torch.tensor([0, 1, 2, 1])
    a = _sample(model, 4, labels, seed=3, temperature=0.9, top_k=5)
    b = _sample(model, 4, labels, seed=3, use_cache=False, temperature=0.9, top_k=5)
    assert a.shape == (4, 9) and torch.equal(a, b)
    assert ((a >= 0) & (a < 11)).all()


def test_top_k_keeps_only_the_k_best():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0, 2.5]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, False, True]]
    model = _prior(num_classes=0)
    tokens = _sample(model, 16, top_k=1)
    # top_k=1 is greedy: every sequence is the same argmax path.
    assert (tokens == tokens[0]).all()
    with pytest.raises(ValueError, match="top_k"):
        SamplingOptions(top_k=0)


def test_class_out_of_range_is_refused():
    with pytest.raises(ValueError, match="out of range"):
        sample(_prior(), 1, torch.tensor([3]))


def test_loss_is_cross_entropy_of_shifted_targets():
    model = _prior()
    tokens = torch.randint(0, 11, (3, 9))
    logits = model(tokens, torch.tensor([0, 1, 2]))
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), tokens.reshape(-1))
    assert torch.allclose(model.loss(tokens, torch.tensor([0, 1, 2])), expected)


def test_prior_export_refuses_another_tokenizer(tmp_path):
    model = _prior()

    class FakeTokenizer:
        fingerprint, codebook_size, column_grids, num_tokens, tiers = "a" * 64, 11, {"tokens": (3, 3)}, 9, ("",)
        column_codebook_sizes = {"tokens": 11}

        def tier_columns(self, tier):
            return list(self.column_grids)

        def tier_grid(self, tier):
            return (3, 3)

    save_prior(tmp_path, model, tokenizer_fingerprint="a" * 64, grid={"tokens": (3, 3)}, class_names=["x", "y", "z"])
    loaded, meta = load_prior(tmp_path, tokenizer=FakeTokenizer())
    assert meta["class_names"] == ["x", "y", "z"]
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )
    FakeTokenizer.fingerprint = "b" * 64
    with pytest.raises(PriorMismatch, match="fingerprint"):
        load_prior(tmp_path, tokenizer=FakeTokenizer())
    FakeTokenizer.fingerprint, FakeTokenizer.column_grids = "a" * 64, {"tokens_top": (3, 3)}
    FakeTokenizer.column_codebook_sizes = {"tokens_top": 11}
    with pytest.raises(PriorMismatch, match="grids"):
        load_prior(tmp_path, tokenizer=FakeTokenizer())


# -- 2D positions, norms, tying, guidance, nucleus, hierarchical ----------------------------------

import math  # noqa: E402

from components.priors import HierarchicalPrior, build_prior  # noqa: E402
from components.priors.sampling import guided  # noqa: E402


def _layout_prior(num_classes=3, **kw) -> TransformerPrior:
    torch.manual_seed(0)
    cfg = PriorConfig(
        vocab_size=11, seq_len=12, num_classes=num_classes, n_layer=2, n_head=2, n_embd=16, layout=((3, 2, 2),), **kw
    )
    return TransformerPrior(cfg).eval()


def _hierarchical(num_classes=3) -> HierarchicalPrior:
    torch.manual_seed(0)
    top = PriorConfig(
        vocab_size=5, seq_len=4, num_classes=num_classes, n_layer=2, n_head=2, n_embd=16, layout=((2, 2, 1),)
    )
    bottom = PriorConfig(
        vocab_size=9,
        seq_len=16,
        num_classes=num_classes,
        n_layer=2,
        n_head=2,
        n_embd=16,
        layout=((2, 2, 1), (4, 4, 1)),
        prefix_len=4,
        prefix_vocab=5,
    )
    return HierarchicalPrior(top, bottom).eval()


@pytest.mark.parametrize("kind", ["2d-rmsnorm-tied", "hierarchical", "guided", "nucleus"])
def test_cached_sampling_equals_uncached_for_every_kind(kind):
    model = (
        _hierarchical()
        if kind == "hierarchical"
        else _layout_prior(norm="rmsnorm", tie_weights=True)
        if kind == "2d-rmsnorm-tied"
        else _layout_prior()
    )
    opts = {"guided": {"guidance_scale": 2.5}, "nucleus": {"top_p": 0.7}}.get(kind, {})
    labels = torch.tensor([0, 1, 2, -1, 1])
    runs = [_sample(model, 5, labels, seed=1, use_cache=c, **opts) for c in (True, False)]
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (5, model.seq_len)


def test_tied_head_is_the_code_embeddings():
    model = _layout_prior(tie_weights=True)
    assert model.head is None
    x = torch.randn(1, 1, 16)
    assert torch.allclose(model.logits(x), model.ln_f(x) @ model.tok_emb.weight[:11].T)


def test_guidance_scale_one_is_conditional_sampling_and_the_formula_holds():
    model = _layout_prior()
    labels = torch.tensor([0, 2, 1])
    plain = sample(model, 3, labels, generator=torch.Generator().manual_seed(5))
    assert torch.equal(_sample(model, 3, labels, seed=5, guidance_scale=1.0), plain)
    # The doubled batch the guided path runs: scale 1 gives the conditional logits, 0 the unconditional.
    tokens = torch.randint(0, 11, (3, 12))
    both = model(torch.cat([tokens, tokens]), torch.cat([labels, torch.full((3,), -1)]))
    cond, uncond = model(tokens, labels), model(tokens, None)
    assert torch.allclose(guided(both, 1.0), cond, atol=1e-5) and torch.allclose(guided(both, 0.0), uncond, atol=1e-5)
    assert torch.allclose(guided(both, 3.0), uncond + 3 * (cond - uncond), atol=1e-4)


def test_the_bottom_prior_depends_on_the_top_tokens():
    model = _hierarchical()
    tokens = torch.randint(0, 5, (1, 20))
    other = tokens.clone()
    other[0, 1] = (other[0, 1] + 1) % 5  # change one top token only
    a, b = model.bottom(tokens, torch.tensor([1])), model.bottom(other, torch.tensor([1]))
    assert not torch.allclose(a, b)
    # ...and not on bottom tokens at or after the position it predicts (causality).
    later = tokens.clone()
    later[0, -1] = (later[0, -1] + 1) % 5
    assert torch.allclose(model.bottom(later, torch.tensor([1])), a)
    assert model.loss(tokens, torch.tensor([1])).item() > 0


def test_samples_stay_inside_top_k_and_top_p():
    torch.manual_seed(0)
    model = TransformerPrior(
        PriorConfig(vocab_size=16, seq_len=10, n_layer=1, n_head=2, n_embd=16, layout=((2, 5, 1),))
    ).eval()
    with torch.no_grad():
        model.tok_emb.weight.mul_(20)  # peaked distributions: the nucleus is a real cut
    for opts in ({"top_k": 3}, {"top_p": 0.6}, {"top_k": 5, "top_p": 0.8}):
        tokens = _sample(model, 64, **opts)
        logits = model(tokens)  # the logits each token was drawn from, recomputed
        allowed = torch.isfinite(filter_logits(logits.reshape(-1, 16), **opts))
        assert allowed.gather(1, tokens.reshape(-1, 1)).all(), opts
        assert allowed.sum(1).float().mean() < 16
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).tolist() == [[True, False, False, False]]


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": 0}, "temperature"),
        ({"labels": torch.tensor([7])}, "out of range"),
    ],
)
def test_bad_sampling_settings_are_refused(opts, match):
    labels = opts.pop("labels", torch.tensor([1]))
    with pytest.raises(ValueError, match=match):
        _sample(_layout_prior(), 1, labels, **opts)


def test_guidance_on_an_unconditional_prior_is_refused():
    with pytest.raises(ValueError, match="unconditional"):
        _sample(_layout_prior(num_classes=0), 2, guidance_scale=2.0)


def test_prior_learns_a_markov_chain_to_its_entropy():
    """Sequences from a 4-state Markov chain: the prior's held-out bits per token come within
    0.05 of the chain's true entropy per token."""
    gen = torch.Generator().manual_seed(0)
    P = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.1, 0.6, 0.3, 0.0], [0.0, 0.2, 0.5, 0.3], [0.4, 0.0, 0.1, 0.5]])
    start = torch.tensor([0.25, 0.25, 0.25, 0.25])
    length = 16

    def chain(n):
        x = torch.empty(n, length, dtype=torch.long)
        x[:, 0] = torch.multinomial(start.expand(n, 4), 1, generator=gen)[:, 0]
        for t in range(1, length):
            x[:, t] = torch.multinomial(P[x[:, t - 1]], 1, generator=gen)[:, 0]
        return x

    def h(p):
        p = p[p > 0]
        return float(-(p * p.log2()).sum())

    # Exact entropy per token: H(x_0) + sum_t E[H(P[x_{t-1}])], with the state distributions.
    dist, total = start.clone(), h(start)
    for _ in range(1, length):
        total += float(sum(dist[s] * h(P[s]) for s in range(4)))
        dist = dist @ P
    true_bits = total / length

    torch.manual_seed(0)
    model = TransformerPrior(
        PriorConfig(vocab_size=4, seq_len=length, n_layer=2, n_head=2, n_embd=32, layout=((4, 4, 1),))
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = chain(20000)
    for _ in range(250):
        batch = train[torch.randint(0, len(train), (128,), generator=gen)]
        loss = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    from components.metrics import bits_per_token

    held_out = bits_per_token(model, chain(4000), None)
    assert abs(held_out - true_bits) < 0.05, (held_out, true_bits)
    print(f"markov: {held_out:.4f} vs true {true_bits:.4f} bits per token")


def test_build_prior_and_hierarchical_export(tmp_path):
    class FakeTokenizer:
        fingerprint, tiers, num_tokens, codebook_size = "f" * 64, ("top", "bottom"), 20, 9
        column_grids = {"tokens_top": (2, 2), "tokens_bottom": (4, 4)}
        column_codebook_sizes = {"tokens_top": 5, "tokens_bottom": 9}

        def tier_columns(self, tier):
            return [f"tokens_{tier}"]

        def tier_grid(self, tier):
            return self.column_grids[f"tokens_{tier}"]

    tok = FakeTokenizer()
    model = build_prior(tok, num_classes=2, n_layer=1, n_head=2, n_embd=16)
    assert isinstance(model, HierarchicalPrior) and model.seq_len == 20
    assert (model.top.cfg.vocab_size, model.bottom.cfg.vocab_size, model.bottom.cfg.prefix_len) == (5, 9, 4)
    save_prior(tmp_path, model, tokenizer_fingerprint=tok.fingerprint, grid=tok.column_grids, class_names=["a", "b"])
    loaded, _ = load_prior(tmp_path, tokenizer=tok)
    tokens = torch.cat([torch.randint(0, 5, (2, 4)), torch.randint(0, 9, (2, 16))], dim=1)
    assert torch.allclose(loaded.loss(tokens, torch.tensor([0, 1])), model.eval().loss(tokens, torch.tensor([0, 1])))
    tok.column_codebook_sizes = {"tokens_top": 5, "tokens_bottom": 16}
    with pytest.raises(PriorMismatch, match="codebook sizes"):
        load_prior(tmp_path, tokenizer=tok)
    assert math.isfinite(loaded(tokens)[:, :4, 5:].max().item()) is False  # the top tier has 5 codes


# -- generation metrics -----------------------------------------------------------------------------

import numpy as np  # noqa: E402

from components.metrics.generation import class_consistency, frechet_distance, precision_recall, train_classifier  # noqa: E402


def test_fid_is_zero_for_identical_sets_and_exact_for_shifted_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 8))
    assert abs(frechet_distance(a, a)) < 1e-8
    # Same covariance, means 3 apart along one axis: FID = |mu_a - mu_b|^2 = 9 (up to sampling).
    b = a + np.array([3.0] + [0.0] * 7)
    assert abs(frechet_distance(a, b) - 9.0) < 1e-6
    # Variance 4 vs 1 in 1-D: FID = (sqrt(4) - sqrt(1))^2 = 1.
    x = rng.normal(size=(200000, 1))
    assert abs(frechet_distance(x, 2 * x) - 1.0) < 0.01
    with pytest.raises(ValueError, match="same d"):
        frechet_distance(a, a[:, :3])


def test_precision_recall_on_constructed_sets():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 4))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    far = real + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    # Samples from one half of the real distribution: precise, but half the real data missed.
    half = real[real[:, 0] > 0.5]
    p, r = precision_recall(real, half)
    assert p == 1.0 and r < 0.6


def test_class_consistency_judge_tells_shapes_apart():
    from components.data.images import to_array
    from components.data.shapes import render

    pairs = [render(i) for i in range(400)]
    images = torch.from_numpy(np.stack([to_array(img) for img, _ in pairs])).float() / 255
    labels = torch.tensor([label for _, label in pairs])
    judge, accuracy = train_classifier(images, labels, 4, steps=120)
    assert accuracy > 0.8
    assert class_consistency(judge, images, labels) > 0.8
    assert class_consistency(judge, images, (labels + 1) % 4) < 0.3


def test_inception_loads_a_local_state_dict_and_refuses_an_incomplete_one(tmp_path):
    from safetensors.torch import save_file

    from components.metrics.inception import FIDInceptionV3, inception_features, load_inception

    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in FIDInceptionV3().state_dict().items()}
    save_file(state, str(tmp_path / "inception.safetensors"))
    torch.save({**state, "fc.weight": torch.zeros(1008, 2048)}, tmp_path / "inception.pth")
    for name in ("inception.safetensors", "inception.pth"):
        net = load_inception(tmp_path / name)
        feats = inception_features(net, torch.rand(2, 3, 32, 32))
        assert feats.shape == (2, 2048) and np.isfinite(feats).all()
    del state["Mixed_7c.branch_pool.conv.weight"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="missing 1 weights"):
        load_inception(tmp_path / "partial.safetensors")
