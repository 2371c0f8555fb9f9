"""MaskGIT (Chang et al. 2022): a bidirectional transformer over the token grid that predicts
hidden tokens from the visible ones; sampling fills the whole grid in T parallel steps
(`Sampler`, components/priors/sampling.py).

Sequence layout for an image of L tokens, some hidden:

    input:   [cond, y_0, y_1, ..., y_{L-1}]     y_i = x_i, or the mask token where x_i is hidden
    slot i+1 predicts x_i; the loss covers the hidden tokens only.

Training hides a share r = cos(pi/2 * u), u ~ U(0, 1), of a sequence's tokens (at least one),
chosen uniformly: the cosine schedule, which hides most tokens most of the time, as decoding
starts from a fully hidden grid. Embedding ids are the AR prior's (codes, classes, the null
token) and then the mask token; positions are the same learned 2D embeddings, for the tokens
(the class token has none). Product and residual tokens (m per position) are m tokens of the
grid with their sub-token embedding, as in the AR prior; a prior over two token tiers
(VQ-VAE-2) is AR only.

Its validation figure is not a likelihood: bits per hidden token, for masks drawn per
validation row from a fixed seed (`validation_masks`), so runs compare with each other but not
with an AR prior's bits per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from components.priors.transformer import PriorConfig, TransformerPrior

EVAL_MASK_SEED = 20_220_208  # validation row r's mask is drawn from this + r


def mask_ratio(progress: torch.Tensor | float) -> torch.Tensor:
    """The cosine schedule: the share of tokens hidden at `progress` in [0, 1] (1 -> 0)."""
    return torch.cos(math.pi / 2 * torch.as_tensor(progress, dtype=torch.float64))


def still_hidden(free: torch.Tensor, step: int, steps: int) -> torch.Tensor:
    """(b,) free positions of each row -> how many stay hidden after decoding step `step` of
    `steps` (0-based): floor(free * mask_ratio((step + 1) / steps)); 0 after the last step."""
    if step + 1 >= steps:
        return torch.zeros_like(free)
    return torch.floor(free.double() * mask_ratio((step + 1) / steps)).long()


def random_masks(batch: int, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, length) bool, True = hidden: per row a share mask_ratio(u), u ~ U(0, 1), of the
    positions (rounded up, at least one), chosen uniformly."""
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    counts = torch.ceil(mask_ratio(u) * length).clamp(1, length).long()
    scores = torch.rand(batch, length, generator=generator)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < counts[:, None]


def validation_masks(first_row: int, batch: int, length: int) -> torch.Tensor:
    """The masks of validation rows first_row .. first_row + batch - 1: row r's from its own
    seed, so they do not depend on how the rows are batched."""
    if not batch:
        return torch.zeros(0, length, dtype=torch.bool)
    seeds = range(EVAL_MASK_SEED + first_row, EVAL_MASK_SEED + first_row + batch)
    return torch.cat([random_masks(1, length, torch.Generator().manual_seed(seed)) for seed in seeds])


class MaskGITPrior(TransformerPrior):
    """A TransformerPrior whose attention is bidirectional and whose input hides tokens."""

    def __init__(self, cfg: PriorConfig):
        if cfg.kind != "maskgit":
            raise ValueError(f"MaskGITPrior needs kind 'maskgit', got {cfg.kind!r}")
        super().__init__(cfg)

    @property
    def mask_token(self) -> int:
        return self.cfg.vocab_size + self.cfg.num_classes + 1 + self.cfg.prefix_vocab

    def masked_ids(self, tokens: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """(b, L) codes and (b, L) hidden -> (b, 1 + L) input ids [cond, y_0 .. y_{L-1}]."""
        ids = torch.where(hidden, torch.full_like(tokens, self.mask_token), tokens)
        return torch.cat([self.cond_tokens(labels, tokens.shape[0], tokens.device), ids], dim=1)

    def forward_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(b, 1 + L) input ids -> logits (b, L, V) for every token."""
        x = self.tok_emb(ids)
        positions = self.embed_positions(0, ids.shape[1] - 1, ids.device)
        x = self.drop(torch.cat([x[:, :1], x[:, 1:] + positions], dim=1))
        for block in self.blocks:
            x, _ = block(x)
        return self.logits(x[:, 1:])

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor | None = None, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens (b, L), hidden (b, L) bool (None: all hidden) -> logits (b, L, V)."""
        if hidden is None:
            hidden = torch.ones_like(tokens, dtype=torch.bool)
        return self.forward_ids(self.masked_ids(tokens, hidden, labels))

    def masked_nll(self, tokens: torch.Tensor, labels: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy (nats) of the hidden tokens."""
        logits = self(tokens, labels, hidden)
        return F.cross_entropy(logits[hidden].float(), tokens[hidden], reduction="sum")

    def loss(
        self, tokens: torch.Tensor, labels: torch.Tensor | None = None, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean cross-entropy in nats per hidden token; masks from the cosine schedule
        (`random_masks`, the global RNG) when `hidden` is None."""
        if hidden is None:
            hidden = random_masks(tokens.shape[0], tokens.shape[1]).to(tokens.device)
        return self.masked_nll(tokens, labels, hidden) / hidden.sum().clamp(min=1)
