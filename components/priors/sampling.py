"""Autoregressive sampling from a prior: KV-cached, batched; temperature, top-k, top-p,
classifier-free guidance; seeded by a torch.Generator."""

from __future__ import annotations

import torch

from components.priors.transformer import HierarchicalPrior, TransformerPrior


def check_sampling(
    model, labels: torch.Tensor | None, temperature: float, top_k: int | None, top_p: float | None, cfg_scale: float
) -> None:
    """Raise ValueError for settings that cannot be sampled, before any work."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    if cfg_scale != 1.0 and not model.num_classes:
        raise ValueError(f"cfg_scale {cfg_scale} needs a class-conditional prior; this one is unconditional")
    if cfg_scale != 1.0 and labels is None:
        raise ValueError("classifier-free guidance needs the classes to sample")
    if labels is not None and len(labels) and model.num_classes:
        if labels.max() >= model.num_classes or labels.min() < -1:
            raise ValueError(
                f"class {int(labels.max() if labels.max() >= model.num_classes else labels.min())} out of range [0, {model.num_classes})"
            )
    elif labels is not None and len(labels) and (labels >= 0).any():
        raise ValueError("class labels given, but the prior is unconditional")


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """(b, V) logits -> tempered logits with everything outside the top k, and outside the
    smallest set of most likely tokens whose probability reaches top_p, set to -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # A token stays when the tokens more likely than it hold less than top_p: the most
        # likely one always does.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def guided(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """(2b, V) logits, conditional rows then unconditional -> (b, V): u + s * (c - u)."""
    cond, uncond = logits.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def _sample_one(
    model: TransformerPrior,
    n: int,
    labels: torch.Tensor | None,
    prefix: torch.Tensor | None,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    cfg_scale: float,
    generator: torch.Generator | None,
    use_cache: bool,
    vocab_limits: torch.Tensor | None,
) -> torch.Tensor:
    device = next(model.parameters()).device
    length, p = model.cfg.seq_len, model.cfg.prefix_len
    guide = cfg_scale != 1.0
    if guide:  # one batch of 2n: conditional rows, then the same rows unconditional
        labels = torch.cat([labels.to(device), torch.full((n,), -1, dtype=torch.long, device=device)])
        prefix = torch.cat([prefix, prefix]) if prefix is not None else None
    rows = 2 * n if guide else n
    idx = model.cond_tokens(labels, rows, device)
    if p:
        idx = torch.cat([idx, prefix.to(device) + model.prefix_offset], dim=1)
    out = torch.empty(n, length, dtype=torch.long, device=device)
    cache = None
    for i in range(length):
        if use_cache:
            logits, cache = model.forward_tokens(
                idx if i == 0 else idx[:, -1:], start=0 if i == 0 else p + i, cache=cache
            )
        else:
            logits, _ = model.forward_tokens(idx)
        step = logits[:, -1].float()
        if guide:
            step = guided(step, cfg_scale)
        if vocab_limits is not None and int(vocab_limits[i]) < step.shape[-1]:
            step[:, int(vocab_limits[i]) :] = float("-inf")
        probs = torch.softmax(filter_logits(step, temperature, top_k, top_p), dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        out[:, i] = nxt[:, 0]
        idx = torch.cat([idx, torch.cat([nxt, nxt]) if guide else nxt], dim=1)
    return out


@torch.no_grad()
def sample(
    model: TransformerPrior | HierarchicalPrior,
    n: int,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    vocab_limits: torch.Tensor | None = None,
    top_p: float | None = None,
    cfg_scale: float = 1.0,
) -> torch.Tensor:
    """Draw n token sequences: (n, L) int64, in the tokenizer's flattening order.

    `labels` (n,) for a conditional prior (-1: unconditional). `cfg_scale` s != 1 samples
    with classifier-free guidance, logits u + s (c - u) from the conditional (c) and
    unconditional (u) predictions; 1 is plain conditional sampling, 0 unconditional.
    With `use_cache` each step feeds one token and reuses every earlier key/value; without it
    each step recomputes the whole prefix (the reference the cache is tested against).
    `vocab_limits` (L,): position i draws only from [0, vocab_limits[i]). A HierarchicalPrior
    draws the top tokens, then the bottom tokens given them."""
    check_sampling(model, labels, temperature, top_k, top_p, cfg_scale)
    model.eval()
    common = dict(
        temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale, generator=generator, use_cache=use_cache
    )
    if isinstance(model, HierarchicalPrior):
        top = _sample_one(model.top, n, labels, None, vocab_limits=None, **common)
        return torch.cat([top, _sample_one(model.bottom, n, labels, top, vocab_limits=None, **common)], dim=1)
    return _sample_one(model, n, labels, None, vocab_limits=vocab_limits, **common)


@torch.no_grad()
def sample_images(
    model: TransformerPrior | HierarchicalPrior,
    tokenizer,
    n: int,
    labels: torch.Tensor | None = None,
    *,
    batch_size: int = 64,
    **options,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """n images drawn in batches of `batch_size` and decoded by `tokenizer` (whose
    `vocab_limits` bound each position): ((n, 3, H, W) in [0, 1] on the CPU, (n, L) tokens,
    seconds spent sampling). `options` go to `sample` (temperature, top_k, top_p, cfg_scale,
    generator)."""
    import time

    limits = tokenizer.vocab_limits()
    started = time.perf_counter()
    tokens = torch.cat(
        [
            sample(
                model,
                min(batch_size, n - start),
                labels[start : start + batch_size] if labels is not None else None,
                vocab_limits=limits,
                **options,
            )
            for start in range(0, n, batch_size)
        ]
    )
    seconds = time.perf_counter() - started
    images = torch.cat(
        [tokenizer.decode(tokenizer.unflatten(tokens[i : i + batch_size])).cpu() for i in range(0, n, batch_size)]
    )
    return images, tokens.cpu(), seconds
