"""Decoder-only causal transformer priors over token sequences, with a KV cache.

Sequence layout for an image of P given (prefix) and L predicted tokens:

    tokens:  x_0 .. x_{P-1} (prefix: a bottom prior's top-tier tokens), x_P .. x_{P+L-1}
    input:   [cond, x_0, x_1, ..., x_{P+L-2}]       cond = class token, or the null token
    slot j predicts x_j; the loss covers the L predicted slots only.

Embedding ids: 0..V-1 are codes, V+c is class c's token, V+C the null (unconditional) token,
V+C+1+k prefix code k. The output head covers the V codes only (optionally tied to their
embeddings).

A text-conditional prior (`text_len` T > 0; no classes) reads a caption before the image, as
DALL-E does, in one causal model over one vocabulary:

    input:   [pad .. pad, c_0 .. c_{l-1}, boi, x_0, ..., x_{P+L-2}]
             T slots of caption ids (UTF-8 bytes, cut to T, right-aligned after pads), then the
             null token as the begin-of-image token; slot T + j predicts x_j as above.

Text id t is embedding V+C+1+prefix_vocab+t, the pad the one after the text ids; the caption's
slots have their own learned positions, counted from the caption's end (the slot before boi is
always the caption's last id, whatever its length). The empty caption (all pads) is the
unconditional input: caption dropout in training, the unconditional half of guidance. Pads are
attended to like any id: the layout is the same in training and sampling, and attention keeps
its plain causal form (no per-row mask).

Positions: learned and 2D. With a `layout` (per tier of the sequence: its grid h, w and the
m tokens per position), slot j gets row, column, sub-token and tier embeddings of the token it
predicts (x_j), summed. Why learned 2D rather than rotary: the grid is fixed per tokenizer (no
length extrapolation wanted), absolute embeddings make the KV cache trivial (a cached key never
needs re-rotating), and factorising rows and columns gives every token its vertical neighbour
as a position feature with h + w + m + tiers vectors instead of h*w*m. Without a layout
(priors exported before it) positions are one learned table over the sequence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

KVCache = list[tuple[torch.Tensor, torch.Tensor]]
NORMS = ("layernorm", "rmsnorm")
# ar: causal, token by token (this module); maskgit: bidirectional over the whole grid, masked
# tokens predicted in parallel (components/priors/maskgit.py).
KINDS = ("ar", "maskgit")


@dataclass(frozen=True)
class PriorConfig:
    vocab_size: int  # codebook size of the predicted tokens
    seq_len: int  # tokens predicted per image
    # The sizes: train_prior's settings (components/settings.py) hold their defaults.
    n_layer: int
    n_head: int
    n_embd: int
    num_classes: int = 0  # 0: unconditional
    # What exports written before these options existed were built with.
    dropout: float = 0.0
    norm: str = "layernorm"  # or rmsnorm
    tie_weights: bool = False  # the output head shares the code embeddings
    # Per tier of the whole sequence (prefix tiers first): [h, w, m]; empty: 1D positions.
    layout: tuple = field(default=())
    prefix_len: int = 0  # leading tokens given, not predicted (a bottom prior's top tokens)
    prefix_vocab: int = 0  # their codebook size
    kind: str = "ar"  # one of KINDS
    text_len: int = 0  # caption slots before the image (0: no text; else no classes)
    text_vocab: int = 0  # caption ids (256: UTF-8 bytes)

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "maskgit" and self.prefix_len:
            raise ValueError("a MaskGIT prior models one token tier: it takes no prefix")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.layout and sum(h * w * m for h, w, m in self.layout) != self.prefix_len + self.seq_len:
            raise ValueError(f"layout {self.layout} does not hold {self.prefix_len} + {self.seq_len} tokens")
        if self.prefix_len and not self.prefix_vocab:
            raise ValueError("a prefix needs its prefix_vocab")
        if self.text_len:
            if not self.text_vocab:
                raise ValueError("caption slots need their text_vocab")
            if self.num_classes:
                raise ValueError("a prior is conditioned on classes or on text, not both")
            if self.kind != "ar":
                raise ValueError("a text-conditional prior is causal (kind ar)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layout"] = [list(tier) for tier in self.layout]
        if self.kind == "ar":  # an AR prior's config reads as before kinds existed
            del d["kind"]
        if not self.text_len:  # and one without text as before text existed
            del d["text_len"], d["text_vocab"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PriorConfig:
        values = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        values["layout"] = tuple(tuple(tier) for tier in d.get("layout", ()))
        return cls(**values)


def _norm(cfg: PriorConfig) -> nn.Module:
    return nn.RMSNorm(cfg.n_embd) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.n_embd)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.causal = cfg.kind == "ar"  # else every position attends to every other

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
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and t > 1, dropout_p=dropout)
        elif t == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # one new query sees everything
        else:
            # Query i (absolute position t_past + i) sees keys 0..t_past + i.
            mask = torch.ones(t, t_past + t, dtype=torch.bool, device=x.device).tril(diagonal=t_past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(b, t, d)), (k, v)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.ln1 = _norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = _norm(cfg)
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


def _positions(layout: tuple) -> torch.Tensor:
    """(P+L, 4) long: tier, row, column, sub-token of every token of the sequence."""
    rows = []
    for tier, (h, w, m) in enumerate(layout):
        r, c, s = torch.meshgrid(torch.arange(h), torch.arange(w), torch.arange(m), indexing="ij")
        rows.append(torch.stack([torch.full_like(r, tier), r, c, s], dim=-1).reshape(-1, 4))
    return torch.cat(rows)


class TransformerPrior(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        v, c = cfg.vocab_size, cfg.num_classes
        # A MaskGIT prior's mask token is the last id.
        masks = 1 if cfg.kind == "maskgit" else 0
        text = cfg.text_vocab + 1 if cfg.text_len else 0  # the text ids and their pad
        self.tok_emb = nn.Embedding(v + c + 1 + cfg.prefix_vocab + masks + text, cfg.n_embd)
        if cfg.text_len:
            self.text_pos_emb = nn.Embedding(cfg.text_len, cfg.n_embd)
        total = cfg.prefix_len + cfg.seq_len
        if cfg.layout:
            self.register_buffer("pos_ids", _positions(cfg.layout), persistent=False)
            self.tier_emb = nn.Embedding(len(cfg.layout), cfg.n_embd)
            self.row_emb = nn.Embedding(max(h for h, _, _ in cfg.layout), cfg.n_embd)
            self.col_emb = nn.Embedding(max(w for _, w, _ in cfg.layout), cfg.n_embd)
            self.sub_emb = nn.Embedding(max(m for _, _, m in cfg.layout), cfg.n_embd)
        else:
            self.pos_emb = nn.Embedding(total, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = _norm(cfg)
        self.head = None if cfg.tie_weights else nn.Linear(cfg.n_embd, v, bias=False)
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
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def conditioning(self) -> str:
        """text | class | none: what the prior samples given."""
        return "text" if self.cfg.text_len else "class" if self.cfg.num_classes else "none"

    @property
    def cond_len(self) -> int:
        """Input slots before the first predicted token's: the class (or null) token, or the
        caption's slots and boi."""
        return self.cfg.text_len + 1

    @property
    def text_offset(self) -> int:
        return self.cfg.vocab_size + self.cfg.num_classes + 1 + self.cfg.prefix_vocab

    def null_condition(self, n: int, device=None) -> torch.Tensor:
        """What samples unconditionally: class -1, or the empty caption (all -1)."""
        shape = (n, self.cfg.text_len) if self.cfg.text_len else (n,)
        return torch.full(shape, -1, dtype=torch.long, device=device)

    @property
    def seq_len(self) -> int:
        return self.cfg.seq_len

    @property
    def null_token(self) -> int:
        return self.cfg.vocab_size + self.cfg.num_classes

    @property
    def prefix_offset(self) -> int:
        return self.cfg.vocab_size + self.cfg.num_classes + 1

    def cond_tokens(self, labels: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """(b,) class ids (-1: none) -> (b, 1) conditioning token ids; for a text prior (b, T)
        caption ids (-1: pad; `components.data.captions.caption_matrix`) -> (b, T + 1), boi last."""
        if self.cfg.text_len:
            return self._caption_tokens(labels, batch, device)
        if labels is None or self.cfg.num_classes == 0:
            return torch.full((batch, 1), self.null_token, dtype=torch.long, device=device)
        labels = labels.to(device)
        if len(labels) and (labels.max() >= self.cfg.num_classes or labels.min() < -1):
            bad = int(labels.max()) if labels.max() >= self.cfg.num_classes else int(labels.min())
            raise ValueError(f"class {bad} out of range [0, {self.cfg.num_classes}) (-1: unconditional)")
        cond = torch.where(labels >= 0, self.cfg.vocab_size + labels, torch.full_like(labels, self.null_token))
        return cond.view(batch, 1)

    def _caption_tokens(self, captions: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        t, pad = self.cfg.text_len, self.text_offset + self.cfg.text_vocab
        if captions is None:
            captions = self.null_condition(batch, device)
        captions = captions.to(device)
        if tuple(captions.shape) != (batch, t):
            raise ValueError(f"captions must be ({batch}, {t}) caption ids (-1: pad), got {tuple(captions.shape)}")
        if captions.numel() and (captions.min() < -1 or captions.max() >= self.cfg.text_vocab):
            raise ValueError(f"caption ids must be in [0, {self.cfg.text_vocab}) (-1: pad)")
        ids = torch.where(captions >= 0, captions + self.text_offset, torch.full_like(captions, pad))
        return torch.cat([ids, torch.full((batch, 1), self.null_token, dtype=torch.long, device=device)], dim=1)

    def input_ids(self, tokens: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """(b, P+L) codes (prefix, then predicted) -> (b, cond_len - 1 + P+L) input ids
        [cond, x_0 .. x_{P+L-2}] (cond: one token, or a caption's T slots and boi)."""
        b, p = tokens.shape[0], self.cfg.prefix_len
        ids = tokens.clone()
        ids[:, :p] += self.prefix_offset
        return torch.cat([self.cond_tokens(labels, b, tokens.device), ids[:, :-1]], dim=1)

    def embed_positions(self, start: int, count: int, device) -> torch.Tensor:
        """Position embeddings of input slots start .. start + count - 1."""
        t = self.cfg.text_len
        if t and start < t:  # caption slots first, then the image's slots counted from boi
            text = self.text_pos_emb(torch.arange(start, min(start + count, t), device=device))
            if start + count <= t:
                return text
            return torch.cat([text, self._image_positions(0, start + count - t, device)])
        return self._image_positions(start - t, count, device)

    def _image_positions(self, start: int, count: int, device) -> torch.Tensor:
        if not self.cfg.layout:
            return self.pos_emb(torch.arange(start, start + count, device=device))
        ids = self.pos_ids[start : start + count]
        return self.tier_emb(ids[:, 0]) + self.row_emb(ids[:, 1]) + self.col_emb(ids[:, 2]) + self.sub_emb(ids[:, 3])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_f(x)
        if self.head is None:
            return F.linear(x, self.tok_emb.weight[: self.cfg.vocab_size])
        return self.head(x)

    def forward_tokens(self, idx: torch.Tensor, start: int = 0, cache: KVCache | None = None):
        """idx: (b, t) input ids at slots start..start+t-1 -> logits (b, t, V), new cache."""
        x = self.drop(self.tok_emb(idx) + self.embed_positions(start, idx.shape[1], idx.device))
        new_cache: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cache[i] if cache is not None else None)
            new_cache.append(kv)
        return self.logits(x), new_cache

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (b, P+L) codes -> logits (b, L, V): predicted position i predicts tokens[:, P+i]."""
        return self.forward_tokens(self.input_ids(tokens, labels))[0][:, self.cond_len - 1 + self.cfg.prefix_len :]

    def targets(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, self.cfg.prefix_len :]

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy in nats per predicted token (divide by ln 2 for bits)."""
        logits = self(tokens, labels)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), self.targets(tokens).reshape(-1))


class HierarchicalPrior(nn.Module):
    """VQ-VAE-2's two priors: `top` over the top-tier tokens, `bottom` over the bottom-tier
    tokens with the top tokens as its prefix (conditioning by prefixing: the bottom prior
    attends to every top token through ordinary causal self-attention, with the KV cache for
    free, where cross-attention would need a second attention per block). Sampling draws the
    top tokens, then the bottom ones. Both take the class token.

    Sequences are the tokenizer's flattening, top tier first: (b, T + B)."""

    def __init__(self, top: PriorConfig, bottom: PriorConfig):
        super().__init__()
        if bottom.prefix_len != top.seq_len or bottom.num_classes != top.num_classes:
            raise ValueError("the bottom prior's prefix must be the top prior's tokens, with the same classes")
        if (bottom.text_len, bottom.text_vocab) != (top.text_len, top.text_vocab):
            raise ValueError("the top and bottom priors must read the same captions")
        self.top = TransformerPrior(top)
        self.bottom = TransformerPrior(bottom)

    @property
    def num_classes(self) -> int:
        return self.top.cfg.num_classes

    @property
    def seq_len(self) -> int:
        return self.top.cfg.seq_len + self.bottom.cfg.seq_len

    @property
    def conditioning(self) -> str:
        return self.top.conditioning

    def null_condition(self, n: int, device=None) -> torch.Tensor:
        return self.top.null_condition(n, device)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(b, T+B) -> logits (b, T+B, max(V_top, V_bottom)); the smaller tier's extra
        vocabulary is -inf (zero probability)."""
        top = self.top(tokens[:, : self.top.cfg.seq_len], labels)
        bottom = self.bottom(tokens, labels)
        width = max(top.shape[-1], bottom.shape[-1])
        pad = lambda t: F.pad(t, (0, width - t.shape[-1]), value=float("-inf"))  # noqa: E731
        return torch.cat([pad(top), pad(bottom)], dim=1)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean nats over all T+B tokens (the joint model's)."""
        t, b = self.top.cfg.seq_len, self.bottom.cfg.seq_len
        return (self.top.loss(tokens[:, :t], labels) * t + self.bottom.loss(tokens, labels) * b) / (t + b)

    def configs(self) -> dict:
        return {"top": self.top.cfg.to_dict(), "bottom": self.bottom.cfg.to_dict()}


def upgrade_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A prior's state dict under today's names: vqpipe 0.1 called the tier embedding `level_emb`."""
    return {name.replace("level_emb.", "tier_emb."): tensor for name, tensor in state.items()}
