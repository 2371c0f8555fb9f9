"""Vector quantization (van den Oord et al. 2017): nearest code by squared distance.

Codebook learned by EMA (decay, Laplace-smoothed counts) or by gradient (codebook loss);
optional cosine codes (inputs and codes l2-normalised) and a low-dimensional codebook behind
in/out projections (Yu et al. 2021); k-means initialisation from the first batches; dead-code
restart that resets a code's EMA statistics along with its vector.

Nearest-code search runs without autograd in row chunks, so the full N x K distance matrix
never exists; quantized vectors are gathered by index (no one-hot matmul); k-means and the
restart use the same search. Under torch.distributed every statistic that moves the codebook
(code counts, EMA sums) is all-reduced, and the random choices among a batch's vectors (the
first codes, the k-means sample, restarted codes) are made by rank 0 among every replica's
rows: the replicas keep identical codebooks, the same as one process would have trained.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from components.quantizers.base import (
    QuantizerOutput,
    all_reduce_sum,
    check_finite,
    check_last_dim,
    code_counts,
    from_rank0,
    projections,
    replica_rows,
    straight_through,
    usage_stats,
)
from components.quantizers.registry import QuantizerConfig, register

# Distances of one search chunk: rows x codes x 4 bytes stay under this, whatever the codebook.
SEARCH_BUDGET_BYTES = 256 * 2**20
# k-means runs on at most this many pooled encoder outputs (64 MB at d=64).
KMEANS_MAX_ROWS = 1 << 18


class VQOptions(QuantizerConfig):
    """Options of a nearest-code codebook, shared by `vq`, `product` (per group) and `residual`
    (per stage)."""

    codebook_size: int = Field(128, ge=2, le=2**31)
    # Commitment weight: how hard the encoder is pulled towards its code.
    beta: float = Field(0.25, ge=0)
    # EMA codebook (stable, no codebook gradient) or codebook learned by gradient.
    ema: bool = True
    decay: float = Field(0.99, gt=0, lt=1)
    eps: float = Field(1e-5, gt=0)
    # l2-normalised inputs and codes: nearest by cosine similarity.
    cosine: bool = False
    # Search in a lower-dimensional space behind learned in/out projections (None: latent width).
    codebook_dim: int | None = Field(None, ge=1)
    # Lloyd iterations initialising the codebook from the first batches (0: random encoder outputs).
    kmeans_iters: int = Field(10, ge=0)
    kmeans_init_batches: int = Field(1, ge=1)
    # Codes unused for this many training steps are re-seeded from encoder outputs (0: never).
    restart_after_steps: int = Field(100, ge=0)
    # EMA codebooks: codes whose EMA count (expected uses per step) falls below this are re-seeded
    # from distinct encoder outputs of the step, at once (0: never). Acts long before a code has
    # gone wholly unused, and keeps every code earning its place.
    dead_code_threshold: float = Field(0.0, ge=0)
    # Gradients through the quantizer by the rotation trick (Fifty et al. 2024) instead of the
    # straight-through copy.
    rotation_trick: bool = False
    # SimVQ (Zhu et al. 2024): the codes are a frozen random basis times one learned linear map,
    # trained by the codebook loss (needs ema: false).
    simvq: bool = False
    # LlamaGen's entropy loss: low entropy of each row's soft assignment (confident codes), high
    # entropy of the batch's mean assignment (all codes used); weight and softmax temperature.
    entropy_loss_weight: float = Field(0.0, ge=0)
    entropy_temperature: float = Field(0.01, gt=0)
    # Rows per chunk of the nearest-code search: bounds memory at chunk x codebook_size floats.
    search_chunk_size: int = Field(8192, ge=1)

    def latent_problems(self, latent_dim: int) -> list[tuple[str, str]]:
        problems = []
        if self.codebook_dim is not None and self.codebook_dim > latent_dim:
            problems.append(
                (
                    "codebook_dim",
                    f"{self.codebook_dim} is larger than the latent it quantizes (latent_dim={latent_dim})",
                )
            )
        if self.dead_code_threshold > 0 and not self.ema:
            problems.append(("dead_code_threshold", "counts codes by their EMA statistics: needs ema: true"))
        if self.simvq and self.ema:
            problems.append(("simvq", "learns its linear map by the codebook loss: needs ema: false"))
        return problems

    def build_codebook(self, dim: int) -> VectorQuantizer:
        """One nearest-code codebook over vectors of width `dim` with these options."""
        return VectorQuantizer(self, dim)


@register("vq")
class VQConfig(VQOptions):
    type: Literal["vq"] = "vq"

    def build(self, dim: int) -> VectorQuantizer:
        self.check_latent(dim)
        return self.build_codebook(dim)


@torch.no_grad()
def nearest_codes(z: torch.Tensor, codebook: torch.Tensor, chunk_size: int = 8192) -> torch.Tensor:
    """Index of the nearest code for each row of z.

    z: (n, d), codebook: (k, d) -> (n,) int64. Ties go to the lowest index. Computed in fp32 in
    chunks of at most `chunk_size` rows, and never more than SEARCH_BUDGET_BYTES of distances:
    memory is one reused chunk x k buffer, never n x k.
    """
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.float()
        codebook = codebook.float()
        k = codebook.shape[0]
        rows_per_chunk = max(1, min(chunk_size, SEARCH_BUDGET_BYTES // (4 * k), z.shape[0]))
        code_sq = (codebook * codebook).sum(dim=1)
        codebook_t = codebook.t()
        out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
        # One buffer for every chunk: a fresh n x k allocation per chunk costs page faults.
        buffer = torch.empty(rows_per_chunk, k, device=z.device)
        for start in range(0, z.shape[0], rows_per_chunk):
            rows = z[start : start + rows_per_chunk]
            dist_sq = buffer[: rows.shape[0]]
            # |z|^2 is constant per row, so it does not change the argmin.
            torch.addmm(code_sq, rows, codebook_t, alpha=-2.0, out=dist_sq)
            torch.argmin(dist_sq, dim=1, out=out[start : start + rows.shape[0]])
    return out


@torch.no_grad()
def kmeans(
    data: torch.Tensor, k: int, iters: int, chunk_size: int = 8192, cosine: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means: (n, d) -> centroids (k, d), counts (k,) of the final assignment.

    Assignments use the chunked search. Under torch.distributed `data` is the same on every
    replica (`replica_rows`): the initial centroids are rank 0's choice and the result rank 0's,
    identical on each. A cluster that empties keeps its previous centroid (dead-code restart
    takes care of it later)."""
    data = data.float()
    n = data.shape[0]
    pick = torch.randperm(n, device=data.device)[:k] if n >= k else torch.randint(0, n, (k,), device=data.device)
    centroids = data[from_rank0(pick)].clone()
    counts = torch.zeros(k, device=data.device)
    for _ in range(iters):
        assign = nearest_codes(data, centroids, chunk_size)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, assign, data)
        means = sums / counts.clamp(min=1).unsqueeze(1)
        if cosine:
            means = F.normalize(means, dim=1)
        centroids = torch.where((counts > 0).unsqueeze(1), means, centroids)
    return from_rank0(centroids), from_rank0(counts)


class Lookup(NamedTuple):
    """One search: h (n, c) the (projected, normalised) inputs, indices (n,), codes (n, c)."""

    h: torch.Tensor
    indices: torch.Tensor
    codes: torch.Tensor


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer. Input (b, h, w, d) or (b, n, d); indices (b, h, w) or (b, n).

    `forward` = `lookup` (search) + `learn` (EMA, restart) + `loss` + `output`; the residual
    quantizer calls the parts itself to share one codebook between stages."""

    index_dtype = torch.int64
    tokens_per_position = 1
    token_names = ("code",)

    def __init__(self, options: VQOptions, dim: int):
        super().__init__()
        codebook_size = options.codebook_size
        self.codebook_size = codebook_size
        self.dim = dim
        self.beta = options.beta
        self.ema = ema = options.ema
        self.decay = options.decay
        self.eps = options.eps
        self.cosine = options.cosine
        self.kmeans_iters = options.kmeans_iters
        self.kmeans_init_batches = options.kmeans_init_batches
        self.restart_after_steps = options.restart_after_steps
        self.dead_code_threshold = options.dead_code_threshold
        self.rotation_trick = options.rotation_trick
        self.entropy_loss_weight = options.entropy_loss_weight
        self.entropy_temperature = options.entropy_temperature
        self.search_chunk_size = options.search_chunk_size
        self.code_dim = options.codebook_dim or dim
        self.project_in, self.project_out = projections(dim, self.code_dim)
        init = torch.randn(codebook_size, self.code_dim) / self.code_dim**0.5
        self.code_map = None
        if ema:
            self.register_buffer("codebook", init)
            self.register_buffer("cluster_size", torch.zeros(codebook_size))
            self.register_buffer("embed_sum", torch.zeros(codebook_size, self.code_dim))
        elif options.simvq:
            # The frozen basis; the codes are code_map(codebook). The map starts as the identity,
            # so k-means and restarts seed the basis with encoder outputs as they are.
            self.register_buffer("codebook", init)
            self.code_map = nn.Linear(self.code_dim, self.code_dim, bias=False)
            nn.init.eye_(self.code_map.weight)
        else:
            self.codebook = nn.Parameter(init)
        # Steps since each code was last chosen, for dead-code restart.
        self.register_buffer("steps_unused", torch.zeros(codebook_size, dtype=torch.long))
        # Set once the codebook has been initialised from encoder outputs.
        self.register_buffer("initialized", torch.tensor(False))
        self._init_pool: list[torch.Tensor] = []
        # While a step's micro-batches pass (`deferred_updates`): each one's searched rows, learned
        # from together when the step ends. None: learn at once.
        self._deferred: list[tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]] | None = None

    def code_vectors(self) -> torch.Tensor:
        """(k, c) the codes as searched: unit vectors in cosine mode."""
        codes = self.codebook if self.code_map is None else self.code_map(self.codebook)
        return F.normalize(codes, dim=1) if self.cosine else codes

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(...,) int -> (..., d) code vectors in the input space."""
        return self.project_out(F.embedding(indices, self.code_vectors()))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        check_last_dim(z, self.dim)
        found = self.lookup(z)
        if self.training:
            counts = self.learn([found.h], [found.indices])
        else:
            counts = code_counts(found.indices, self.codebook_size, reduce=False)
        quantized = self.output(found).view_as(z).to(z.dtype)
        return QuantizerOutput(quantized, found.indices.view(z.shape[:-1]), self.loss(found), usage_stats(counts))

    def lookup(self, z: torch.Tensor) -> Lookup:
        """(..., d) -> the nearest codes of its rows. In training, initialises the codebook on
        the first batches."""
        flat = z.reshape(-1, self.dim).float()
        if self.training:
            check_finite(flat)
        h = self.project_in(flat)
        if self.cosine:
            h = F.normalize(h, dim=1)
        if self.training and not bool(self.initialized):
            self._initialise(h.detach())
        vectors = self.code_vectors()
        indices = nearest_codes(h, vectors, self.search_chunk_size)
        return Lookup(h, indices, F.embedding(indices, vectors))

    def loss(self, found: Lookup, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Commitment (beta), plus the codebook term when codes learn by gradient; over the
        rows selected by the boolean mask `rows` (all by default)."""
        h, codes = (found.h, found.codes) if rows is None else (found.h[rows], found.codes[rows])
        if h.numel() == 0:
            return found.h.sum() * 0.0
        commitment = F.mse_loss(h, codes.detach())
        loss = self.beta * commitment
        if not self.ema:
            loss = loss + F.mse_loss(codes, h.detach())
        if self.entropy_loss_weight > 0 and self.training:
            loss = loss + self.entropy_loss_weight * self.entropy_loss(h)
        return loss

    def entropy_loss(self, h: torch.Tensor) -> torch.Tensor:
        """LlamaGen's entropy penalty: the mean entropy of each row's softmax over negative
        squared distances (at `entropy_temperature`) minus the entropy of their mean. Needs the
        rows x codes affinities with their gradient: memory grows with both."""
        vectors = self.code_vectors()
        affinity = 2.0 * h @ vectors.t() - (vectors * vectors).sum(1)  # -|h - c|^2 up to a per-row constant
        log_probs = torch.log_softmax(affinity / self.entropy_temperature, dim=1)
        probs = log_probs.exp()
        per_row = -(probs * log_probs).sum(1).mean()
        mean = probs.mean(0)
        return per_row + (mean * torch.log(mean.clamp(min=1e-12))).sum()

    def output(self, found: Lookup) -> torch.Tensor:
        """(n, d) quantized vectors: exactly the codes forward; backward the identity
        (straight-through) or the rotation trick (`base.straight_through`)."""
        return self.project_out(straight_through(found.h, found.codes, self.rotation_trick))

    @torch.no_grad()
    def learn(self, hs: list[torch.Tensor], indices: list[torch.Tensor]) -> torch.Tensor:
        """One training step's codebook update from searched rows (several lists when stages
        share this codebook): EMA and dead-code restart. Returns the code counts, summed over
        replicas: counted once, they serve the stats, the EMA and the restart alike. Between
        `begin_deferred` and `finish_deferred` the rows are kept instead, and the counts returned
        are this micro-batch's."""
        counts = code_counts(torch.cat(indices), self.codebook_size, reduce=True)
        if self._deferred is not None:
            self._deferred.append(([x.detach().float() for x in hs], list(indices), counts))
            return counts
        return self._learn(hs, indices, counts)

    def begin_deferred(self) -> None:
        self._deferred = []

    @torch.no_grad()
    def finish_deferred(self, apply: bool = True) -> None:
        """Learn once from every micro-batch kept since `begin_deferred`, rows in the order one
        batch of them all would have (stage by stage, then micro-batch by micro-batch)."""
        pending, self._deferred = self._deferred, None
        if apply and pending:
            hs = [torch.cat(parts) for parts in zip(*(h for h, _, _ in pending), strict=True)]
            indices = [torch.cat(parts) for parts in zip(*(i for _, i, _ in pending), strict=True)]
            # The micro-batches' counts (already summed over replicas) add up to the batch's.
            self._learn(hs, indices, torch.stack([c for _, _, c in pending]).sum(0))

    def _learn(self, hs: list[torch.Tensor], indices: list[torch.Tensor], counts: torch.Tensor) -> torch.Tensor:
        hs = [x.detach().float() for x in hs]
        if self.ema:
            self._ema_update(torch.cat(hs), torch.cat(indices), counts)
        self._restart_dead_codes(hs, counts)
        self._replace_rare_codes(hs)
        return counts

    @torch.no_grad()
    def _ema_update(self, h: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        sums = all_reduce_sum(torch.zeros_like(self.embed_sum).index_add_(0, indices, h))
        self.cluster_size.mul_(self.decay).add_(counts.float(), alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # Laplace smoothing keeps rarely used codes from dividing by ~0.
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.codebook_size * self.eps) * total
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))

    @torch.no_grad()
    def _restart_dead_codes(self, hs: list[torch.Tensor], counts: torch.Tensor) -> None:
        if self.restart_after_steps <= 0:
            return
        self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
        dead = (self.steps_unused >= self.restart_after_steps).nonzero().squeeze(1)
        if dead.numel():
            h = _batch_rows(hs)
            # Every replica takes rank 0's choice, so the codebooks stay identical.
            pick = from_rank0(torch.randint(0, h.shape[0], (dead.numel(),), device=h.device))
            self._set_codes(dead, h[pick], torch.ones(dead.numel(), device=h.device))

    @torch.no_grad()
    def _replace_rare_codes(self, hs: list[torch.Tensor]) -> None:
        """Codes whose EMA count is below `dead_code_threshold` take distinct rows of this step
        (as many as there are rows; the rest wait for later steps), each as a cluster of the
        threshold's size."""
        if self.dead_code_threshold <= 0:
            return
        rare = (self.cluster_size < self.dead_code_threshold).nonzero().squeeze(1)
        if not rare.numel():
            return
        h = _batch_rows(hs)
        if rare.numel() > h.shape[0]:
            rare = from_rank0(rare[torch.randperm(rare.numel(), device=h.device)[: h.shape[0]]])
        vectors = h[from_rank0(torch.randperm(h.shape[0], device=h.device)[: rare.numel()])]
        self._set_codes(rare, vectors, torch.full((rare.numel(),), self.dead_code_threshold, device=h.device))

    @torch.no_grad()
    def _set_codes(self, which: torch.Tensor, vectors: torch.Tensor, sizes: torch.Tensor) -> None:
        """Put `vectors` at codes `which`, their EMA statistics with them: each becomes a
        cluster of `sizes` at its new vector. Resetting only the vector would let the old EMA
        sums drag it straight back on the next update."""
        if self.code_map is not None:
            # The basis row whose image under the map is the vector.
            vectors = vectors @ torch.linalg.pinv(self.code_map.weight.detach().float()).t()
        self.codebook.data[which] = vectors
        if self.ema:
            self.cluster_size[which] = sizes
            self.embed_sum[which] = vectors * sizes.unsqueeze(1)
        self.steps_unused[which] = 0

    @torch.no_grad()
    def _initialise(self, h: torch.Tensor) -> None:
        """Random encoder outputs at once (so the first steps quantize sensibly), then k-means
        over the pooled outputs of the first `kmeans_init_batches` batches."""
        h = replica_rows(h)  # rank 0 chooses among every replica's rows
        everything = torch.arange(self.codebook_size, device=h.device)
        if not self._init_pool:
            pick = from_rank0(torch.randint(0, h.shape[0], (self.codebook_size,), device=h.device))
            self._set_codes(everything, h[pick], torch.ones(self.codebook_size, device=h.device))
        if self.kmeans_iters == 0:
            self.initialized.fill_(True)
            return
        per_batch = max(1, KMEANS_MAX_ROWS // self.kmeans_init_batches)
        self._init_pool.append(h[from_rank0(torch.randperm(h.shape[0], device=h.device)[:per_batch])])
        if len(self._init_pool) < self.kmeans_init_batches:
            return
        centroids, counts = kmeans(
            torch.cat(self._init_pool), self.codebook_size, self.kmeans_iters, self.search_chunk_size, self.cosine
        )
        # EMA counts at the rate of one batch, at least one, so every code starts as a cluster.
        self._set_codes(everything, centroids, (counts / len(self._init_pool)).clamp(min=1))
        self._init_pool = []
        self.initialized.fill_(True)


def _batch_rows(hs: list[torch.Tensor]) -> torch.Tensor:
    """This step's rows over every replica, stage by stage as one process would hold them."""
    return torch.cat([replica_rows(h) for h in hs])
