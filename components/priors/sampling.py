"""Autoregressive sampling from a prior: KV-cached, batched; temperature, top-k, top-p,
classifier-free guidance; seeded by a torch.Generator.

The settings travel as one `SamplingOptions`, checked once: its values when it is made, and
against the prior and the classes asked for when a `Sampler` draws.

    sampler = Sampler(prior, SamplingOptions(temperature=0.9, guidance_scale=2.0), generator)
    tokens = sampler.draw(n, labels)                        # (n, L)
    images, tokens, seconds = sample_images(sampler, tokenizer, n, labels, batch_size=64)
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from components.config import SamplingOptions
from components.priors.transformer import HierarchicalPrior, TransformerPrior


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """(b, V) logits -> tempered logits with everything outside the top k, and outside the
    smallest set of most likely tokens whose probability reaches top_p, set to -inf. The values
    are those of a `SamplingOptions`, which checked them."""
    logits = logits.float() / temperature
    if top_k is not None:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # A token stays when the tokens more likely than it hold less than top_p: the most
        # likely one always does.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def guided(logits: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """(2b, V) logits, conditional rows then unconditional -> (b, V): u + s * (c - u)."""
    cond, uncond = logits.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


class Sampler:
    """Draws token sequences from a prior (a TransformerPrior, or a HierarchicalPrior: top
    tokens, then bottom tokens given them) with one set of options and one generator.

    With `use_cache` each step feeds one token and reuses every earlier key/value; without it
    each step recomputes the whole prefix (the reference the cache is tested against)."""

    def __init__(
        self,
        model: TransformerPrior | HierarchicalPrior,
        options: SamplingOptions | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ):
        self.model = model
        self.options = options or SamplingOptions()
        self.generator = generator
        self.use_cache = use_cache

    def draw(
        self, n: int, labels: torch.Tensor | None = None, vocab_limits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """n token sequences: (n, L) int64, in the tokenizer's flattening order. `labels` (n,)
        for a conditional prior (-1: unconditional); `vocab_limits` (L,): position i draws only
        from [0, vocab_limits[i])."""
        self.options.check(self.model, labels)
        return self._draw(n, labels, vocab_limits)

    @torch.no_grad()
    def _draw(self, n: int, labels: torch.Tensor | None, vocab_limits: torch.Tensor | None) -> torch.Tensor:
        self.model.eval()
        if isinstance(self.model, HierarchicalPrior):
            top = self._draw_tier(self.model.top, n, labels, None, None)
            return torch.cat([top, self._draw_tier(self.model.bottom, n, labels, top, None)], dim=1)
        return self._draw_tier(self.model, n, labels, None, vocab_limits)

    def _draw_tier(
        self,
        model: TransformerPrior,
        n: int,
        labels: torch.Tensor | None,
        prefix: torch.Tensor | None,
        vocab_limits: torch.Tensor | None,
    ) -> torch.Tensor:
        opts = self.options
        device = next(model.parameters()).device
        length, p = model.cfg.seq_len, model.cfg.prefix_len
        if opts.guided:  # one batch of 2n: conditional rows, then the same rows unconditional
            labels = torch.cat([labels.to(device), torch.full((n,), -1, dtype=torch.long, device=device)])
            prefix = torch.cat([prefix, prefix]) if prefix is not None else None
        idx = model.cond_tokens(labels, 2 * n if opts.guided else n, device)
        if p:
            idx = torch.cat([idx, prefix.to(device) + model.prefix_offset], dim=1)
        out = torch.empty(n, length, dtype=torch.long, device=device)
        cache = None
        for i in range(length):
            if self.use_cache:
                step_input = idx if i == 0 else idx[:, -1:]
                logits, cache = model.forward_tokens(step_input, start=0 if i == 0 else p + i, cache=cache)
            else:
                logits, _ = model.forward_tokens(idx)
            step = logits[:, -1].float()
            if opts.guided:
                step = guided(step, opts.guidance_scale)
            if vocab_limits is not None and int(vocab_limits[i]) < step.shape[-1]:
                step[:, int(vocab_limits[i]) :] = float("-inf")
            probs = torch.softmax(filter_logits(step, opts.temperature, opts.top_k, opts.top_p), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=self.generator)
            out[:, i] = nxt[:, 0]
            idx = torch.cat([idx, torch.cat([nxt, nxt]) if opts.guided else nxt], dim=1)
        return out


def sample(
    model: TransformerPrior | HierarchicalPrior,
    n: int,
    labels: torch.Tensor | None = None,
    options: SamplingOptions | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """n token sequences (n, L) from `model`: `Sampler(model, options, generator).draw(n, labels)`."""
    return Sampler(model, options, generator).draw(n, labels)


def image_batches(
    sampler: Sampler, tokenizer, n: int, labels: torch.Tensor | None, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, float]]:
    """`sample_images` a batch at a time: (images (b, 3, H, W) in [0, 1] on the CPU, the batch's
    labels, seconds spent sampling it); memory holds one batch. The same draws as `sample_images`."""
    sampler.options.check(sampler.model, labels)
    limits = tokenizer.vocab_limits()
    for start in range(0, n, batch_size):
        batch_labels = labels[start : start + batch_size] if labels is not None else None
        began = time.perf_counter()
        tokens = sampler._draw(min(batch_size, n - start), batch_labels, limits)
        seconds = time.perf_counter() - began
        yield tokenizer.decode(tokenizer.unflatten(tokens)).cpu(), batch_labels, seconds


def sample_images(
    sampler: Sampler, tokenizer, n: int, labels: torch.Tensor | None, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """n images drawn in batches of `batch_size` and decoded by `tokenizer` (whose
    `vocab_limits` bound each position): ((n, 3, H, W) in [0, 1] on the CPU, (n, L) tokens,
    seconds spent sampling). The options are checked once, for all n."""
    sampler.options.check(sampler.model, labels)
    limits = tokenizer.vocab_limits()
    started = time.perf_counter()
    batches = []
    for start in range(0, n, batch_size):
        batch_labels = labels[start : start + batch_size] if labels is not None else None
        batches.append(sampler._draw(min(batch_size, n - start), batch_labels, limits))
    tokens = torch.cat(batches)
    seconds = time.perf_counter() - started
    images = torch.cat(
        [tokenizer.decode(tokenizer.unflatten(tokens[i : i + batch_size])).cpu() for i in range(0, n, batch_size)]
    )
    return images, tokens.cpu(), seconds
