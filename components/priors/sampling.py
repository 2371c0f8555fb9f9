"""Sampling from a prior: an AR prior token by token (KV-cached), a MaskGIT prior in parallel
decoding steps; batched; temperature, top-k, top-p, classifier-free guidance (constant or
ramped); tokens given at fixed positions kept as given (inpainting, editing); seeded by a
torch.Generator.

The settings travel as one `SamplingOptions`, checked once: its values when it is made, and
against the prior and the classes asked for when a `Sampler` draws.

    sampler = Sampler(prior, SamplingOptions(temperature=0.9, guidance_scale=2.0), generator)
    tokens = sampler.draw(n, labels)                        # (n, L)
    tokens = sampler.draw(n, labels, given=partial)         # partial (n, L): -1 where free
    images, tokens, seconds = sample_images(sampler, tokenizer, n, labels, batch_size=64)
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from components.config import SamplingOptions
from components.priors.maskgit import MaskGITPrior, still_hidden
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


def gumbel(shape: tuple[int, ...], generator: torch.Generator | None, device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device).clamp(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


class Sampler:
    """Draws token sequences from a prior (a TransformerPrior, a MaskGITPrior, or a
    HierarchicalPrior: top tokens, then bottom tokens given them) with one set of options and
    one generator.

    An AR prior: with `use_cache` each step feeds one token and reuses every earlier
    key/value; without it each step recomputes the whole prefix (the reference the cache is
    tested against). A MaskGIT prior (Chang et al. 2022): every free position starts hidden;
    each of `decode_steps` steps draws a token for every hidden position, keeps the most
    confident (log-probability of the drawn token plus Gumbel noise times choice_temperature x
    (1 - progress)) and hides the rest again, as many as the cosine schedule says; after the
    last step none is hidden."""

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
        self,
        n: int,
        labels: torch.Tensor | None = None,
        vocab_limits: torch.Tensor | None = None,
        given: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """n token sequences: (n, L) int64, in the tokenizer's flattening order. `labels` (n,)
        for a class-conditional prior (-1: unconditional), or (n, T) caption ids for a text
        prior (`components.data.captions.caption_matrix`); `vocab_limits` (L,): position i draws only
        from [0, vocab_limits[i]); `given` (n, L): tokens kept as they are where >= 0 (an AR
        prior draws the others given the earlier tokens, a MaskGIT prior given all of them)."""
        self.options.check(self.model, labels)
        if given is not None:
            self._check_given(n, given, vocab_limits)
        return self._draw(n, labels, vocab_limits, given)

    def _check_given(self, n: int, given: torch.Tensor, vocab_limits: torch.Tensor | None) -> None:
        length = self.model.seq_len
        if tuple(given.shape) != (n, length):
            raise ValueError(f"given tokens must be ({n}, {length}) (-1 where free), got {tuple(given.shape)}")
        vocab = self.model.cfg.vocab_size if isinstance(self.model, TransformerPrior) else None
        limits = vocab_limits.to(given.device) if vocab_limits is not None else None
        if limits is None and vocab is not None:
            limits = torch.full((length,), vocab, device=given.device)
        bad = given < -1
        if limits is not None:
            bad |= given >= limits[None, :]
        if bad.any():
            row, col = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"given token {int(given[row, col])} at row {row}, position {col} is not a code there")

    @torch.no_grad()
    def _draw(
        self,
        n: int,
        labels: torch.Tensor | None,
        vocab_limits: torch.Tensor | None,
        given: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.model.eval()
        if isinstance(self.model, HierarchicalPrior):
            t = self.model.top.cfg.seq_len
            top_given, bottom_given = (given[:, :t], given[:, t:]) if given is not None else (None, None)
            top = self._draw_tier(self.model.top, n, labels, None, None, top_given)
            return torch.cat([top, self._draw_tier(self.model.bottom, n, labels, top, None, bottom_given)], dim=1)
        if isinstance(self.model, MaskGITPrior):
            return self._decode(self.model, n, labels, vocab_limits, given)
        return self._draw_tier(self.model, n, labels, None, vocab_limits, given)

    def _draw_tier(
        self,
        model: TransformerPrior,
        n: int,
        labels: torch.Tensor | None,
        prefix: torch.Tensor | None,
        vocab_limits: torch.Tensor | None,
        given: torch.Tensor | None = None,
    ) -> torch.Tensor:
        opts = self.options
        device = next(model.parameters()).device
        length, p = model.cfg.seq_len, model.cfg.prefix_len
        given = given.to(device) if given is not None else None
        if opts.guided:  # one batch of 2n: conditional rows, then the same rows unconditional
            labels = torch.cat([labels.to(device), model.null_condition(n, device)])
            prefix = torch.cat([prefix, prefix]) if prefix is not None else None
        idx = model.cond_tokens(labels, 2 * n if opts.guided else n, device)
        if p:
            idx = torch.cat([idx, prefix.to(device) + model.prefix_offset], dim=1)
        out = torch.empty(n, length, dtype=torch.long, device=device)
        cache = None
        for i in range(length):
            if self.use_cache:
                step_input = idx if i == 0 else idx[:, -1:]
                start = 0 if i == 0 else model.cond_len - 1 + p + i
                logits, cache = model.forward_tokens(step_input, start=start, cache=cache)
            else:
                logits, _ = model.forward_tokens(idx)
            step = logits[:, -1].float()
            if opts.guided:
                step = guided(step, opts.scale_at(i, length))
            if vocab_limits is not None and int(vocab_limits[i]) < step.shape[-1]:
                step[:, int(vocab_limits[i]) :] = float("-inf")
            probs = torch.softmax(filter_logits(step, opts.temperature, opts.top_k, opts.top_p), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=self.generator)
            if given is not None:
                nxt = torch.where(given[:, i : i + 1] >= 0, given[:, i : i + 1], nxt)
            out[:, i] = nxt[:, 0]
            idx = torch.cat([idx, torch.cat([nxt, nxt]) if opts.guided else nxt], dim=1)
        return out

    def _decode(
        self,
        model: MaskGITPrior,
        n: int,
        labels: torch.Tensor | None,
        vocab_limits: torch.Tensor | None,
        given: torch.Tensor | None,
    ) -> torch.Tensor:
        """MaskGIT's parallel decoding (class doc): `decode_steps` forward passes."""
        opts = self.options
        device = next(model.parameters()).device
        length, vocab, steps = model.cfg.seq_len, model.cfg.vocab_size, opts.decode_steps
        tokens = torch.zeros(n, length, dtype=torch.long, device=device)
        known = torch.zeros(n, length, dtype=torch.bool, device=device)
        if given is not None:
            known = given.to(device) >= 0
            tokens = torch.where(known, given.to(device), tokens)
        free = (~known).sum(dim=1)
        if opts.guided:  # conditional rows, then the same rows unconditional
            labels = torch.cat([labels.to(device), torch.full((n,), -1, dtype=torch.long, device=device)])
        banned = None
        if vocab_limits is not None:
            banned = torch.arange(vocab, device=device)[None, :] >= vocab_limits.to(device)[:, None]  # (L, V)
        for step in range(steps):
            hidden = ~known
            if not hidden.any():
                break
            if opts.guided:
                ids = model.masked_ids(torch.cat([tokens, tokens]), torch.cat([hidden, hidden]), labels)
            else:
                ids = model.masked_ids(tokens, hidden, labels)
            logits = model.forward_ids(ids).float()
            if opts.guided:
                logits = guided(logits, opts.scale_at(step, steps))
            if banned is not None:
                logits = logits.masked_fill(banned, float("-inf"))
            flat = filter_logits(logits.reshape(n * length, vocab), opts.temperature, opts.top_k, opts.top_p)
            drawn = torch.multinomial(torch.softmax(flat, dim=-1), 1, generator=self.generator)
            confidence = torch.log_softmax(flat, dim=-1).gather(1, drawn).view(n, length)
            drawn = drawn.view(n, length)
            noise = opts.choice_temperature * (1.0 - (step + 1) / steps)
            if noise > 0:
                confidence = confidence + noise * gumbel((n, length), self.generator, device)
            confidence = confidence.masked_fill(known, float("inf"))
            # The least confident of the hidden positions stay hidden: as many as the
            # schedule says, and at least one position is filled per step.
            stay = torch.minimum(still_hidden(free, step, steps), hidden.sum(dim=1) - 1).clamp(min=0)
            ranks = confidence.argsort(dim=1).argsort(dim=1)
            reveal = hidden & (ranks >= stay[:, None])
            tokens = torch.where(reveal, drawn, tokens)
            known = known | reveal
        return tokens


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
