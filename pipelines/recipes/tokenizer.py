"""The tokenizer's training recipe: one object per DDP worker (the only one when the stage
trains in its own process), its state on `self`.

    recipe = TokenizerRecipe(cfg, job, rank, world_size, device)
    recipe.restore()     # from the stage's checkpoint, when there is one to resume
    recipe.train()       # steps, validation and checkpoints until cfg.steps
    recipe.export()      # rank 0: the tokenizer, summary.json and the plot CSV into job.staging

Rank 0 logs to the stage's MLflow run, validates and writes the checkpoints; every rank takes
part in the collectives (gathering RNG states for the checkpoint, the replica check).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from components.checkpoint import rng_state, set_rng_state
from components.config import TrainTokenizerConfig
from components.data.shards import shard_paths, split_batches, to_float
from components.data.stream import StreamLayout, TrainingStream, assembled
from components.io import write_json
from components.metrics import make_grid, psnr, ssim
from components.tokenizers import Tokenizer, export_config
from components.tokenizers.training import TokenizerStep, build_step, compile_convolutions
from pipelines.recipes.checkpointing import CheckpointFile, gather, replicas_identical
from pipelines.runtime import autocast_dtype, seed_everything
from pipelines.tracking import MetricLogger, log_run_params, system_metrics

log = logging.getLogger("vqpipe.train_tokenizer")
VAL_IMAGES = 512  # validation images per evaluation: enough for a stable PSNR, cheap on CPU
VAL_BATCH = 64  # validated at once: bounded memory at 256 px too
GRID_IMAGES = 16
PLOT_KEYS = ["loss", "recon_loss", "codebook_usage", "val_psnr"]
HISTORY = "history.jsonl"  # the metric history, beside the checkpoint
REPLICA_SEED = 7919  # rank r draws its own noise (dropout, Gumbel) from seed + r * this


@dataclass
class Job:
    """What a training worker needs besides the config, as plain values: it crosses to Ray
    workers, whose working directory is not this one (hence absolute paths)."""

    shards: str
    checkpoint_dir: str
    staging: str  # rank 0 writes the export, summary.json and the plot CSV here
    image_size: int
    data_fingerprint: str  # the training shards' sha256s, hashed: a checkpoint is tied to its data
    run_id: str
    tracking_uri: str
    perceptual_weights: str | None


class TokenizerRecipe:
    def __init__(self, cfg: TrainTokenizerConfig, job: Job, rank: int, world_size: int, device: torch.device):
        self.cfg, self.job, self.device = cfg, job, device
        self.rank, self.world_size, self.lead = rank, world_size, rank == 0
        seed_everything(cfg.seed)  # identical initial weights on every rank
        amp = autocast_dtype(cfg.precision, device)
        self.step_fn: TokenizerStep = build_step(cfg, job.image_size, device, amp, job.perceptual_weights)
        self.per_rank = cfg.batch_size // world_size
        settings = {**cfg.training_settings(), "image_size": job.image_size, "data": job.data_fingerprint}
        self.checkpoints = CheckpointFile(Path(job.checkpoint_dir), "train_tokenizer", settings)
        self.start = self.step = 0
        self.seconds = 0.0  # spent training in this run
        self.data_start: int | None = 0  # None: continue on fresh samples (the data layout changed)
        self.history_rows = 0  # lines of the metric history the checkpoint resumed from saw
        self.legacy_history: list[dict] | None = None  # a vqpipe <= 0.2 checkpoint's own history
        self.previous_run = ""  # the MLflow run that wrote the checkpoint resumed from
        self.metrics: MetricLogger | None = None
        self.last_parts: dict[str, torch.Tensor] = {}

    def restore(self) -> None:
        """Continue from the stage's checkpoint when the resume rules allow (checkpointing.py)."""
        cfg = self.cfg
        state = self.checkpoints.restorable(cfg.steps, self.device, self.lead) if cfg.resume else None
        if state is not None:
            self.step_fn.load_state_dict(state)
            rngs = state["rng"]
            if len(rngs) == self.world_size:
                set_rng_state(rngs[self.rank])
            else:
                torch.manual_seed(cfg.seed + REPLICA_SEED * self.rank + state["step"])
            # The lanes and the batch are training settings (equal, or refused above), so the data
            # position replays exactly whatever the workers; a checkpoint of vqpipe <= 0.7 was
            # written by a stream of other batches, which continues on fresh samples.
            exact = "lanes" in state
            if self.lead and not exact:
                log.info("a checkpoint of vqpipe <= 0.7: continuing on fresh samples")
            self.start = self.step = state["step"]
            self.history_rows = state.get("history_rows", 0)
            self.legacy_history = state.get("history")
            self.data_start = state["step"] if exact else None
            self.previous_run = state.get("mlflow_run_id", "")
        elif self.rank > 0:
            torch.manual_seed(cfg.seed + REPLICA_SEED * self.rank)

    def train(self) -> None:
        """Steps until cfg.steps, validating every val_every and checkpointing every
        checkpoint_every steps (and at the end)."""
        cfg = self.cfg
        self._distribute()
        loader = self._loader()
        monitor = self._start_tracking() if self.lead else None
        started, pieces = time.perf_counter(), None
        try:
            pieces = iter(loader)
            batches = assembled(pieces, loader.dataset.pieces_per_batch, pin_memory=self.device.type == "cuda")
            while self.step < cfg.steps:
                images, _labels = next(batches)
                self.step += 1
                self.last_parts = self.step_fn.step(images, self.step)
                if self.lead:
                    self._log_step()
                    if self.step % cfg.val_every == 0 or self.step == cfg.steps:
                        self.validate((self.step - self.start) / (time.perf_counter() - started))
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.checkpoint()
        finally:
            _stop_loader(pieces)
            if monitor is not None:
                monitor.finish()
        self.seconds = time.perf_counter() - started

    @torch.no_grad()
    def validate(self, steps_per_second: float) -> None:
        """PSNR/SSIM of the reconstructions of the first VAL_IMAGES validation images, streamed
        a batch at a time, and a grid of the first GRID_IMAGES (rank 0)."""
        model = self.step_fn.trained_model  # the weights' EMA when kept: what is exported
        was_training = model.training
        model.eval()
        psnr_sum = ssim_sum = 0.0
        count, shown = 0, None
        for raw, _, _ in split_batches(self.job.shards, "val", VAL_BATCH, limit=VAL_IMAGES):
            images = to_float(raw)
            x = images.to(self.device) * 2.0 - 1.0
            recon = ((model(x).reconstruction.float() + 1.0) / 2.0).clamp(0, 1).cpu()
            psnr_sum += psnr(recon, images).sum().item()
            ssim_sum += ssim(recon, images).sum().item()
            count += len(images)
            if shown is None:
                # Originals on the top row, their reconstructions under them.
                n = min(GRID_IMAGES, len(images))
                shown = make_grid(torch.cat([images[:n], recon[:n]]), nrow=n, upscale=2)
        model.train(was_training)
        val_psnr, val_ssim = psnr_sum / count, ssim_sum / count
        self.metrics.log(self.step, {"val_psnr": val_psnr, "val_ssim": val_ssim})
        self.metrics.client.log_image(self.job.run_id, shown, key="reconstructions", step=self.step)
        parts = self.last_parts
        log.info(
            "step %d/%d  loss %.4f  usage %.1f%%  perplexity %.1f  val PSNR %.2f dB  (%.1f steps/s)",
            *(self.step, self.cfg.steps, parts["loss"].item(), parts["codebook_usage"].item()),
            *(parts["perplexity"].item(), val_psnr, steps_per_second),
        )

    def checkpoint(self) -> None:
        """Every rank's RNG state gathered; rank 0 writes the whole training state."""
        rngs = gather(rng_state(), self.world_size)
        if not self.lead:
            return
        self.metrics.flush()  # the history file holds every row the checkpoint counts
        state = {
            **self.step_fn.state_dict(),
            "lanes": self.cfg.lanes,
            "rng": rngs,
            "history_rows": self.metrics.rows,
            "mlflow_run_id": self.job.run_id,
        }
        self.checkpoints.save(state, self.step, complete=self.step == self.cfg.steps)

    def export(self) -> None:
        """Rank 0: the tokenizer, summary.json and the plot CSV into job.staging. Every rank
        takes part in the replica check first."""
        step_fn = self.step_fn
        ema = step_fn.weight_ema.model if step_fn.weight_ema is not None else None
        modules = {"model": step_fn.model, "disc": step_fn.disc, "lecam": step_fn.lecam, "weight_ema": ema}
        identical = replicas_identical(modules, self.world_size)
        if not self.lead:
            return
        if not identical:
            log.warning("the replicas' weights or codebooks differ at the end of training")
        self.metrics.flush()
        staging = Path(self.job.staging)
        Tokenizer(_cpu_copy(step_fn.trained_model), export_config(self.cfg, self.job.image_size)).save(
            staging / "tokenizer"
        )
        write_json(staging / "summary.json", self._summary(identical))
        self.metrics.write_csv(staging / "train_tokenizer.csv", PLOT_KEYS)

    def _summary(self, identical: bool) -> dict:
        cfg, trained, last = self.cfg, self.cfg.steps - self.start, self.metrics.last
        return {
            "steps": cfg.steps,
            "resumed_from_step": self.start,
            "steps_per_second": trained / self.seconds if trained > 0 else None,
            "images_per_second": trained * cfg.batch_size / self.seconds if trained > 0 else None,
            "workers": self.world_size,
            "replicas_identical": identical,
            "val_psnr": last("val_psnr"),
            "val_ssim": last("val_ssim"),
            "train_loss": last("loss"),
            "train_codebook_usage": last("codebook_usage"),
            "train_perplexity": last("perplexity"),
        }

    def _distribute(self) -> None:
        """DDP-wrap the trained modules (several workers) and compile them (cfg.compile)."""
        step_fn, device = self.step_fn, self.device
        if self.world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            # broadcast_buffers=False: the EMA codebooks are kept identical by the quantizers' own
            # all-reduces (tested), not by overwriting them with rank 0's.
            step_fn.generator = DistributedDataParallel(step_fn.model, device_ids=ids, broadcast_buffers=False)
            if step_fn.disc is not None:
                step_fn.discriminator = DistributedDataParallel(step_fn.disc, device_ids=ids, broadcast_buffers=False)
        if self.cfg.compile:
            compile_convolutions(step_fn)

    def _loader(self) -> DataLoader:
        # A stream that cannot be replayed exactly continues on fresh samples instead.
        exact = self.data_start is not None
        return build_loader(
            self.cfg,
            self.job.shards,
            StreamLayout(self.cfg.batch_size, self.cfg.lanes, self.rank, self.world_size, self.cfg.loader_workers),
            start_batch=self.data_start or 0,
            seed=self.cfg.seed if exact else self.cfg.seed + self.start,
        )

    def _start_tracking(self):
        """Rank 0: the metric logger (with the resumed history), the run's model params and
        system metrics."""
        job, step_fn = self.job, self.step_fn
        self.metrics = MetricLogger(job.run_id, Path(job.checkpoint_dir) / HISTORY, flush_every=self.cfg.log_every)
        self.metrics.resume(self.history_rows, self.legacy_history)
        parameters = sum(p.numel() for p in step_fn.model.parameters())
        log.info("tokenizer: %s network, %.2fM parameters", self.cfg.network, parameters / 1e6)
        params = {
            "model.parameters": parameters,
            "data.image_size": job.image_size,
            "train.autocast_dtype": str(step_fn.amp_dtype or torch.float32),
            "train.world_size": self.world_size,
            "train.device": str(self.device),
        }
        if step_fn.disc is not None:
            params["disc.parameters"] = sum(p.numel() for p in step_fn.disc.parameters())
        log_run_params(self.metrics.client, job.run_id, params)
        if self.start:
            # The steps before `start` were logged to the run that wrote the checkpoint.
            self.metrics.client.set_tag(job.run_id, "vqpipe.resumed_from_step", str(self.start))
            self.metrics.client.set_tag(job.run_id, "vqpipe.resumed_from_run", self.previous_run)
        return system_metrics(job.run_id, job.tracking_uri)

    def _log_step(self) -> None:
        step_fn = self.step_fn
        lrs = {"lr": step_fn.opt_g.param_groups[0]["lr"]}
        if step_fn.opt_d is not None:
            lrs["lr_disc"] = step_fn.opt_d.param_groups[0]["lr"]
        self.metrics.log(self.step, {**{k: v.item() for k, v in self.last_parts.items()}, **lrs})


def build_loader(
    cfg: TrainTokenizerConfig,
    shards: str | Path,
    layout: StreamLayout,
    start_batch: int = 0,
    seed: int | None = None,
) -> DataLoader:
    """Endless pieces of uint8 training batches from the train shards, decoded in
    `cfg.loader_workers` DataLoader processes; `components.data.stream.assembled` makes them
    batches (components/data/stream.py: lanes, shuffling, resuming)."""
    workers = cfg.loader_workers
    stream = TrainingStream(
        shard_paths(shards, "train"),
        layout,
        shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed if seed is None else seed,
        start_batch=start_batch,
    )
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
        # Its own generator: the loader must not draw from the global RNG, which a resumed run restores.
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def _stop_loader(batches) -> None:
    """Stop the loader's worker processes now, not whenever the iterator is collected."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # only multi-process iterators have it
    if shutdown is not None:
        try:
            shutdown()
        except RuntimeError as err:  # a loader process that ended badly while being stopped
            log.warning("stopping the data loader: %s", err)


def _cpu_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format)


def train_worker(cfg: TrainTokenizerConfig, job: Job, rank: int, world_size: int, device: torch.device) -> None:
    """One worker's whole part: restore, train, export."""
    recipe = TokenizerRecipe(cfg, job, rank, world_size, device)
    recipe.restore()
    recipe.train()
    recipe.export()
