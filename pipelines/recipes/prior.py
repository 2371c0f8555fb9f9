"""The prior's training recipe: one object per DDP worker (the only one when the stage trains
in its own process), its state on `self`.

    recipe = PriorRecipe(cfg, job, rank, world_size, device)
    recipe.restore()     # from the stage's checkpoint, when there is one to resume
    recipe.train()       # steps, validation and checkpoints until cfg.steps
    recipe.export()      # rank 0: the prior, summary.json and the plot CSV into job.staging

Every rank reads its own batch_size / world_size rows of each step's batch from the token
parts (components/data/token_stream.py: lanes that fix the order whatever the ranks, seeded
shuffle buffers, an exact resume position), so memory is bounded by row groups and buffers,
never by the corpus; which classes are dropped, and a MaskGIT prior's masks, are drawn for the
whole batch from (seed, step), so they do not depend on the ranks either. DDP averages the
gradients; rank 0 logs, validates, checkpoints and exports.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from components.checkpoint import rng_state, set_rng_state
from components.config import TrainPriorConfig
from components.data import part_footers
from components.data import tokens as token_io
from components.data.captions import TEXT_VOCAB, caption_matrix
from components.data.token_stream import TokenStream
from components.io import write_json
from components.metrics import PriorBits
from components.optim import MuonAdamW, muon_groups
from components.priors import build_prior, save_prior
from components.priors.maskgit import random_masks
from components.priors.transformer import upgrade_state
from components.schedules import lr_factor
from components.tokenizers import Tokenizer
from components.weight_ema import WeightEMA
from pipelines.recipes.checkpointing import CheckpointFile, gather, replicas_identical
from pipelines.runtime import Paths, autocast_dtype, seed_everything
from pipelines.tracking import MetricLogger, log_run_params

log = logging.getLogger("vqpipe.train_prior")
VAL_BATCH = 256
REPLICA_SEED = 1_000_003  # rank r's noise (dropout) is seeded with seed + r * this
DROPOUT_STRIDE = 1_000_003  # step t's label dropout is drawn from seed * this + t
HISTORY = "history.jsonl"  # the metric history, beside the checkpoint


@dataclass
class PriorJob:
    """What a training worker needs besides the config (plain values: it travels to Ray)."""

    root: str  # the project (absolute)
    checkpoint_dir: str
    run_id: str  # the stage's MLflow run, logged to by rank 0
    tracking_uri: str
    staging: str  # rank 0 writes prior/, summary.json and train_prior.csv here


class _Loss(torch.nn.Module):
    """The prior's loss as a module's forward, so DistributedDataParallel syncs its gradients.

    A MaskGIT prior's ranks hide different numbers of tokens: each rank's summed loss is
    divided by the whole batch's hidden tokens over the ranks, so DDP's mean of the ranks'
    gradients is the gradient of the batch's mean loss, as one process computes it."""

    def __init__(self, model: torch.nn.Module, world_size: int):
        super().__init__()
        self.model, self.world_size = model, world_size

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor | None, hidden: torch.Tensor | None, batch_hidden: int
    ) -> torch.Tensor:
        if hidden is None:
            return self.model.loss(tokens, labels)
        return self.model.masked_nll(tokens, labels, hidden) * self.world_size / max(batch_hidden, 1)


class PriorRecipe:
    def __init__(self, cfg: TrainPriorConfig, job: PriorJob, rank: int, world_size: int, device: torch.device):
        self.cfg, self.job, self.device = cfg, job, device
        self.rank, self.world_size, self.lead = rank, world_size, rank == 0
        seed_everything(cfg.seed)  # the same initial weights on every rank
        paths = Paths(job.root)
        self.tokenizer = Tokenizer.load(paths.tokenizer)
        self._open_tokens(paths)
        self.model = _build_model(cfg, self.tokenizer, self.row_length, self.num_classes, self.caption_len).to(device)
        self.optimizer = _build_optimizer(cfg, self.model, device)
        # What is validated and exported when kept: an average of the weights (the live model trains).
        self.weight_ema = WeightEMA(self.model, cfg.weight_ema_decay) if cfg.weight_ema_decay else None
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor("cosine", cfg.steps, cfg.warmup_steps, min_ratio=0.1)
        )
        self.metrics = None
        if self.lead:
            self.metrics = MetricLogger(job.run_id, Path(job.checkpoint_dir) / HISTORY, flush_every=cfg.log_every)
            self._log_params()
        # The parts' identity (from their footers) ties a checkpoint to its data.
        settings = {**cfg.training_settings(), "tokenizer": self.tokenizer.fingerprint, "parts": self.parts_id}
        self.checkpoints = CheckpointFile(Path(job.checkpoint_dir), "train_prior", settings, self._legacy_settings)
        self.start = self.step = 0
        # The stream's seed and the batches it had given when this run began.
        self.stream_seed, self.data_start = cfg.seed, 0
        self.seconds = 0.0  # spent training in this run
        self.val_bits = float("nan")

    def _open_tokens(self, paths: Paths) -> None:
        """The train and val parts, checked against the tokenizer; nothing is read but footers
        and the labels' statistics."""
        fingerprint = self.tokenizer.fingerprint
        self.train_parts = token_io.split_parts(paths.tokens, "train")
        self.val_parts = token_io.split_parts(paths.tokens, "val")
        infos = token_io.check_parts(self.train_parts + self.val_parts, fingerprint)
        self.tiers = infos[0].tiers
        self.row_length = sum(h * w for h, w in infos[0].grid.values())
        self.train_rows = sum(info.rows for info in infos[: len(self.train_parts)])
        self.class_names = token_io.read_manifest(paths.tokens).get("classes")
        largest = part_footers.largest_label(self.train_parts)
        self.num_classes = 0
        if largest >= 0 and self.cfg.condition == "class":
            self.num_classes = len(self.class_names) if self.class_names else largest + 1
        self.caption_len = 0
        if self.cfg.condition == "text":
            uncaptioned = [p for p in self.train_parts if "caption" not in pq.read_schema(p).names]
            if uncaptioned:
                raise ValueError(
                    f"train_prior.condition is text, but {uncaptioned[0]} (and {len(uncaptioned) - 1} other train "
                    "parts) hold no captions: shard a captioned source (WebDataset txt members, a Parquet "
                    "caption_column; the built-in shapes are captioned), or use condition class or none"
                )
            self.caption_len = self.cfg.text.max_caption_tokens
        self.parts_id = part_footers.parts_identity(self.train_parts, infos[: len(self.train_parts)])

    def _legacy_settings(self, saved: dict) -> dict:
        """A checkpoint of vqpipe <= 0.2 is tied to a sha256 of all its tokens (`data`): the
        same tokens are the same parts. One written before `kind` existed is an AR prior's, before
        `condition` existed a class prior's, before `optimizer` existed AdamW's without a weight
        average."""
        saved = {"kind": "ar", "condition": "class", "optimizer": "adamw", "weight_ema_decay": None, **saved}
        if "data" in saved and "parts" not in saved:
            digest = saved["data"]
            same = digest == part_footers.legacy_tokens_digest(self.train_parts, self.tiers)
            saved = {k: v for k, v in saved.items() if k != "data"}
            saved["parts"] = self.parts_id if same else f"other tokens (sha256 {digest[:12]}...)"
        return saved

    def _log_params(self) -> None:
        values = {
            "model.parameters": sum(p.numel() for p in self.model.parameters()),
            "model.kind": type(self.model).__name__,
            "model.prior_kind": self.cfg.kind,
            "model.condition": self.model_condition,
            "data.train_rows": self.train_rows,
            "data.num_classes": self.num_classes,
        }
        log_run_params(self.metrics.client, self.job.run_id, values)

    def restore(self) -> None:
        """Continue from the stage's checkpoint when the resume rules allow (checkpointing.py):
        model, optimizer, schedule, every rank's RNG state, the data position, the metric history.
        Any number of DDP workers resumes it: the batches do not depend on them."""
        cfg = self.cfg
        state = self.checkpoints.restorable(cfg.steps, self.device, self.lead) if cfg.resume else None
        rows, legacy = 0, None
        if state is not None:
            self.model.load_state_dict(upgrade_state(state["model"]))
            self.optimizer.load_state_dict(state["optimizer"])
            if self.weight_ema is not None:
                self.weight_ema.load_state_dict(state["weight_ema"])
            self.schedule.load_state_dict(state["schedule"])
            rngs = state["rng"]
            self.start = self.step = state["step"]
            if len(rngs) == self.world_size:
                set_rng_state(rngs[self.rank])
            else:
                torch.manual_seed(cfg.seed + REPLICA_SEED * self.rank + self.start)
            rows, legacy = state.get("history_rows", 0), state.get("history")
            if "lanes" in state:
                self.stream_seed, self.data_start = state["stream_seed"], state["batches"]
            else:  # vqpipe <= 0.7 read other batches (<= 0.2: rows at random): a fresh stream goes on
                self.stream_seed, self.data_start = cfg.seed + self.start, 0
        elif self.rank > 0:
            torch.manual_seed(cfg.seed + REPLICA_SEED * self.rank)
        if self.lead:
            self.metrics.resume(rows, legacy)
            self.val_bits = self.metrics.last("val_bits_per_token") or float("nan")
            if self.start:
                self.metrics.client.set_tag(self.job.run_id, "vqpipe.resumed_from_step", str(self.start))

    def train(self) -> None:
        """Steps until cfg.steps, validating every val_every and checkpointing every
        checkpoint_every steps (and at the end)."""
        cfg = self.cfg
        loss_fn: torch.nn.Module = _Loss(self.model, self.world_size)
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            loss_fn = DistributedDataParallel(loss_fn, device_ids=ids)
        amp = autocast_dtype(cfg.precision, self.device)
        stream = TokenStream(
            self.train_parts,
            self.tiers,
            cfg.batch_size,
            lanes=cfg.lanes,
            rank=self.rank,
            world_size=self.world_size,
            shuffle_buffer=cfg.shuffle_buffer,
            seed=self.stream_seed,
            start_batch=self.data_start,
            caption_len=self.caption_len,
            held_out=frozenset(self.cfg.text.held_out_captions if self.caption_len else ()),
        )
        batches = iter(stream)
        started = time.perf_counter()
        self.model.train()
        for step in range(self.start + 1, cfg.steps + 1):
            self.step = step
            tokens, labels, hidden, batch_hidden = self._batch(batches)
            with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
                loss = loss_fn(tokens, labels, hidden, batch_hidden)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.schedule.step()
            if self.weight_ema is not None:
                self.weight_ema.update(self.model)
            bits = self._mean_over_ranks(loss.detach().float() / math.log(2))
            if self.lead:
                self.metrics.log(step, {"train_bits_per_token": bits.item(), "lr": self.schedule.get_last_lr()[0]})
                if step % cfg.val_every == 0 or step == cfg.steps:
                    self.validate(bits.item(), (step - self.start) / (time.perf_counter() - started))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                self.checkpoint()
        self.seconds = time.perf_counter() - started

    def _batch(self, batches) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int]:
        """This rank's next batch from its stream: tokens, the condition (classes dropped to the
        null token, or a text prior's captions to the empty one, with probability
        label_dropout), a MaskGIT prior's hidden tokens (None for an AR prior) and how many the
        whole batch hides. Drops and masks are drawn for the whole batch from (seed, step), this
        rank's rows taken, so the same rows lose their condition and hide the same tokens
        whatever the ranks."""
        tokens, labels, captions = next(batches)
        draws = torch.Generator().manual_seed(self.cfg.seed * DROPOUT_STRIDE + self.step)
        mine = slice(self.rank * len(tokens), (self.rank + 1) * len(tokens))
        if self.num_classes or self.caption_len:
            dropped = torch.rand(self.cfg.batch_size, generator=draws)[mine] < self.cfg.label_dropout
        if self.caption_len:
            labels = captions.masked_fill(dropped[:, None], -1).to(self.device)
        elif self.num_classes:
            labels = torch.where(dropped, torch.full_like(labels, -1), labels).to(self.device)
        else:
            labels = None
        hidden, batch_hidden = None, 0
        if self.cfg.kind == "maskgit":
            masks = random_masks(self.cfg.batch_size, tokens.shape[1], draws)
            hidden, batch_hidden = masks[mine].to(self.device), int(masks.sum())
        return tokens.to(self.device), labels, hidden, batch_hidden

    @property
    def trained_model(self) -> torch.nn.Module:
        """What is validated and exported: the weights' average when one is kept."""
        return self.weight_ema.model if self.weight_ema is not None else self.model

    def _mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(value)
            value /= self.world_size
        return value

    def validate(self, train_bits: float, steps_per_second: float) -> None:
        """Bits per token of the first `val_max_rows` validation rows, streamed (rank 0)."""
        bits, rows, limit = PriorBits(self.trained_model), 0, self.cfg.val_max_rows
        for batch in token_io.iter_token_batches(self.val_parts, VAL_BATCH, captions=bool(self.caption_len)):
            if limit is not None:
                if rows >= limit:
                    break
                batch = batch.rows(0, limit - rows)
            bits.add(torch.from_numpy(batch.tokens), self._condition(batch))
            rows += len(batch.keys)
        self.val_bits = bits.bits
        self.metrics.log(self.step, {"val_bits_per_token": self.val_bits})
        log.info(
            "step %d/%d  train %.3f  val %.3f bits/token  (%.1f steps/s)",
            *(self.step, self.cfg.steps, train_bits, self.val_bits, steps_per_second),
        )

    def _condition(self, batch: token_io.TokenBatch) -> torch.Tensor | None:
        """What the prior is given for a batch of token rows: captions, classes or nothing."""
        if self.caption_len:
            return caption_matrix(batch.captions, self.caption_len)
        return torch.from_numpy(batch.labels) if self.num_classes else None

    @property
    def model_condition(self) -> str:
        return "text" if self.caption_len else "class" if self.num_classes else "none"

    def _text_meta(self) -> dict | None:
        """What a text prior's export says of its captions (evaluate prompts it with the held-out ones)."""
        if not self.caption_len:
            return None
        return {
            "vocabulary": "utf-8 bytes",
            "vocab_size": TEXT_VOCAB,
            "max_caption_tokens": self.caption_len,
            "held_out_captions": list(self.cfg.text.held_out_captions),
        }

    def checkpoint(self) -> None:
        """Every rank's RNG state gathered; rank 0 writes the whole training state."""
        rngs = gather(rng_state(), self.world_size)
        if not self.lead:
            return
        self.metrics.flush()  # the history file holds every row the checkpoint counts
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            **({"weight_ema": self.weight_ema.state_dict()} if self.weight_ema is not None else {}),
            "rng": rngs,
            "history_rows": self.metrics.rows,
            # Batches the stream gave since it began at this seed: where to go on.
            "lanes": self.cfg.lanes,
            "stream_seed": self.stream_seed,
            "batches": self.data_start + self.step - self.start,
        }
        self.checkpoints.save(state, self.step, complete=self.step == self.cfg.steps)

    def export(self) -> None:
        """Rank 0: the prior, summary.json and the plot CSV into job.staging. Every rank takes
        part in the replica check first (DDP keeps the replicas equal: a sha256 shows it)."""
        ema = self.weight_ema.model if self.weight_ema is not None else None
        identical = replicas_identical({"model": self.model, "weight_ema": ema}, self.world_size)
        if not self.lead:
            return
        self.metrics.flush()
        staging, tokenizer = Path(self.job.staging), self.tokenizer
        save_prior(
            staging / "prior",
            self.trained_model.cpu(),
            tokenizer_fingerprint=tokenizer.fingerprint,
            grid=tokenizer.column_grids,
            class_names=self.class_names if self.num_classes else None,
            text=self._text_meta(),
        )
        summary = {
            "steps": self.cfg.steps,
            "workers": self.world_size,
            "replicas_identical": identical,
            "resumed_from_step": self.start,
            "steps_per_second": (self.cfg.steps - self.start) / max(self.seconds, 1e-9),
            "train_bits_per_token": self.metrics.last("train_bits_per_token"),
            "val_bits_per_token": self.val_bits,
        }
        write_json(staging / "summary.json", summary)
        self.metrics.write_csv(staging / "train_prior.csv", ["train_bits_per_token", "val_bits_per_token"])


def _build_model(cfg: TrainPriorConfig, tokenizer: Tokenizer, row_length: int, num_classes: int, text_len: int):
    if row_length != tokenizer.num_tokens:
        raise ValueError(f"token rows have {row_length} tokens, the tokenizer makes {tokenizer.num_tokens}")
    sizes = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "dropout", "norm", "tie_weights")}
    return build_prior(tokenizer, num_classes=num_classes, kind=cfg.kind, text_len=text_len, **sizes)


def _build_optimizer(cfg: TrainPriorConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    if cfg.optimizer == "muon":
        # Orthogonalised in bf16 where training autocasts to it (native bf16): 3.5x faster than fp32.
        ns_dtype = autocast_dtype(cfg.precision, device) or torch.float32
        return MuonAdamW(
            muon_groups(model, cfg.muon_lr, cfg.lr, cfg.weight_decay), betas=(0.9, 0.95), ns_dtype=ns_dtype
        )
    # Weight decay on matrices only: decaying norms, biases and embeddings hurts small models.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "emb" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def train_worker(cfg: TrainPriorConfig, job: PriorJob, rank: int, world_size: int, device: torch.device) -> None:
    """One worker's whole part: restore, train, export."""
    recipe = PriorRecipe(cfg, job, rank, world_size, device)
    recipe.restore()
    recipe.train()
    recipe.export()
