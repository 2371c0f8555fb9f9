"""Autoregressive sampling from a TransformerPrior: KV-cached, batched, temperature and top-k."""

from __future__ import annotations

import torch

from components.priors.transformer import TransformerPrior


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """(b, V) logits -> tempered logits with everything outside the top k set to -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


@torch.no_grad()
def sample(
    model: TransformerPrior,
    n: int,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    vocab_limits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw n token sequences: (n, L) int64. `labels` (n,) for a conditional prior.

    With `use_cache` each step feeds one token and reuses every earlier key/value; without it
    each step recomputes the whole prefix (the reference the cache is tested against).
    `vocab_limits` (L,): position i draws only from [0, vocab_limits[i]) (`Tokenizer.vocab_limits`:
    a hierarchical level whose codebook is smaller than the vocabulary)."""
    model.eval()
    device = next(model.parameters()).device
    length = model.cfg.seq_len
    idx = model.cond_tokens(labels, n, device)
    out = torch.empty(n, length, dtype=torch.long, device=device)
    cache = None
    for i in range(length):
        if use_cache:
            logits, cache = model.forward_tokens(idx[:, -1:] if i else idx, start=i, cache=cache)
        else:
            logits, _ = model.forward_tokens(idx)
        step_logits = logits[:, -1]
        if vocab_limits is not None and int(vocab_limits[i]) < step_logits.shape[-1]:
            step_logits = step_logits.clone()
            step_logits[:, int(vocab_limits[i]) :] = float("-inf")
        probs = torch.softmax(filter_logits(step_logits, temperature, top_k), dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        out[:, i] = nxt[:, 0]
        idx = torch.cat([idx, nxt], dim=1)
    return out
