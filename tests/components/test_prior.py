import pytest
import torch

from components.priors import PriorConfig, TransformerPrior, filter_logits, load_prior, sample, save_prior
from components.priors.export import PriorMismatch


def _prior(num_classes=3) -> TransformerPrior:
    torch.manual_seed(0)
    return TransformerPrior(PriorConfig(vocab_size=11, seq_len=9, num_classes=num_classes, n_layer=2, n_head=2, n_embd=16)).eval()


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


def test_cached_sampling_equals_uncached_token_for_token():
    model = _prior()
    labels = torch.tensor([0, 1, 2, 1])
    a = sample(model, 4, labels, temperature=0.9, top_k=5, generator=torch.Generator().manual_seed(3))
    b = sample(model, 4, labels, temperature=0.9, top_k=5, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert a.shape == (4, 9) and torch.equal(a, b)
    assert ((a >= 0) & (a < 11)).all()


def test_top_k_keeps_only_the_k_best():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0, 2.5]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, False, True]]
    model = _prior(num_classes=0)
    tokens = sample(model, 16, top_k=1, generator=torch.Generator().manual_seed(0))
    # top_k=1 is greedy: every sequence is the same argmax path.
    assert (tokens == tokens[0]).all()
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(logits, top_k=0)


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
        fingerprint, codebook_size, column_grids, num_tokens = "a" * 64, 11, {"tokens": (3, 3)}, 9

    save_prior(tmp_path, model, tokenizer_fingerprint="a" * 64, grid={"tokens": (3, 3)}, class_names=["x", "y", "z"])
    loaded, meta = load_prior(tmp_path, tokenizer=FakeTokenizer())
    assert meta["class_names"] == ["x", "y", "z"]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    FakeTokenizer.fingerprint = "b" * 64
    with pytest.raises(PriorMismatch, match="fingerprint"):
        load_prior(tmp_path, tokenizer=FakeTokenizer())
    FakeTokenizer.fingerprint, FakeTokenizer.column_grids = "a" * 64, {"tokens_top": (3, 3)}
    with pytest.raises(PriorMismatch, match="grids"):
        load_prior(tmp_path, tokenizer=FakeTokenizer())
