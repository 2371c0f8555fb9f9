"""Decoder-only causal transformer prior over token sequences, with a KV cache.

Sequence layout for an image of L tokens (raster order):

    input:   [cond, t_0, t_1, ..., t_{L-2}]      cond = class token, or the null token
    target:  [t_0,  t_1, t_2, ..., t_{L-1}]

Embedding ids: 0..V-1 are codes, V+c is class c's token, V+C is the null (unconditional) token.
The output head covers the V codes only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class PriorConfig:
    vocab_size: int  # codebook size
    seq_len: int  # tokens per image
    num_classes: int = 0  # 0: unconditional
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PriorConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x: (b, t, d); past: cached (k, v), each (b, heads, t_past, d/heads).

        With a cache the new queries attend to every cached position and causally among
        themselves; returns (b, t, d) and the extended cache."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        t_past = k.shape[2] - t
        dropout = self.dropout if self.training else 0.0
        if t_past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, dropout_p=dropout)
        else:
            # Query i (absolute position t_past + i) sees keys 0..t_past + i.
            mask = torch.ones(t, t_past + t, dtype=torch.bool, device=x.device).tril(diagonal=t_past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(b, t, d)), (k, v)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
            nn.GELU(),
            nn.Linear(4 * cfg.n_embd, cfg.n_embd),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x, past=None):
        a, cache = self.attn(self.ln1(x), past)
        x = x + a
        return x + self.mlp(self.ln2(x)), cache


class TransformerPrior(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size + cfg.num_classes + 1, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                # GPT-2's scaled init of residual projections keeps deep stacks stable.
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def null_token(self) -> int:
        return self.cfg.vocab_size + self.cfg.num_classes

    def cond_tokens(self, labels: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """(b,) class ids (-1: none) -> (b, 1) conditioning token ids."""
        if labels is None or self.cfg.num_classes == 0:
            return torch.full((batch, 1), self.null_token, dtype=torch.long, device=device)
        labels = labels.to(device)
        if labels.max() >= self.cfg.num_classes:
            raise ValueError(f"class {int(labels.max())} out of range [0, {self.cfg.num_classes})")
        cond = torch.where(labels >= 0, self.cfg.vocab_size + labels, torch.full_like(labels, self.null_token))
        return cond.view(batch, 1)

    def forward_tokens(self, idx: torch.Tensor, start: int = 0, cache: KVCache | None = None):
        """idx: (b, t) embedding ids at positions start..start+t-1 -> logits (b, t, V), new cache."""
        pos = torch.arange(start, start + idx.shape[1], device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        new_cache: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cache[i] if cache is not None else None)
            new_cache.append(kv)
        return self.head(self.ln_f(x)), new_cache

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (b, L) codes -> logits (b, L, V): position i predicts tokens[:, i]."""
        b = tokens.shape[0]
        idx = torch.cat([self.cond_tokens(labels, b, tokens.device), tokens[:, :-1]], dim=1)
        return self.forward_tokens(idx)[0]

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy in nats per token (divide by ln 2 for bits)."""
        logits = self(tokens, labels)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1))
