"""Stage `train_tokenizer`: a VQ-VAE, VQ-VAE-2 or VQ-GAN trained on the shards, streamed with
WebDataset, in this process or on N Ray Train workers; resumable.

    dvc repro train_tokenizer          # or: python -m pipelines.train_tokenizer

Writes models/tokenizer/{config.json,model.safetensors} (load with
`components.tokenizers.Tokenizer.load`), metrics/train_tokenizer.json and
plots/train_tokenizer.csv. One MLflow run per stage run (only rank 0 logs): all params, losses,
codebook usage and perplexity and learning rates per step, PSNR/SSIM and a reconstruction grid
per validation, system metrics, and the exported tokenizer.

Checkpoints: a full training state in `checkpoint_dir` every `checkpoint_every` steps and at
the end (components/checkpoint.py). Rerunning after a kill resumes from it; a checkpoint of an
unfinished run with other training settings is refused, naming them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from components.checkpoint import (
    CheckpointMismatch,
    compare_settings,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from components.config import TrainTokenizerConfig
from components.data.shards import load_split, read_manifest, shard_paths, to_float
from components.data.stream import TrainingStream
from components.io import write_json
from components.metrics import make_grid, psnr, ssim
from components.tokenizers import VQVAE, VQVAE2, Tokenizer, export_config, state_fingerprint
from components.tokenizers.lpips import LPIPS, reconstruction_loss
from components.tokenizers.vqgan import LeCAM, PatchDiscriminator, adaptive_weight, discriminator_loss, generator_loss
from pipelines.distributed import train_on_ray
from pipelines.runtime import Paths, autocast_dtype, resolve_device, seed_everything, stage_main
from pipelines.tracking import MetricLogger, absolute_tracking_uri, register_export, stage_run

log = logging.getLogger("vqpipe.train_tokenizer")
VAL_IMAGES = 512  # validation images per evaluation: enough for a stable PSNR, cheap on CPU
GRID_IMAGES = 16
PLOT_KEYS = ["loss", "recon_loss", "codebook_usage", "val_psnr"]


@dataclass
class TrainTokenizerResult:
    out_dir: Path
    fingerprint: str
    metrics: dict
    run_id: str  # the stage's MLflow run


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


def run(cfg: TrainTokenizerConfig, paths: Paths = Paths()) -> TrainTokenizerResult:
    manifest = read_manifest(paths.shards)
    image_size = manifest["image_size"]
    if image_size % cfg.downsample:
        raise ValueError(
            f"train_tokenizer.downsample={cfg.downsample} does not divide the shards' image size {image_size}"
        )
    if cfg.workers == 1:
        resolve_device(cfg.device)  # fail before the run starts, not in it
    train_sums = sorted(s["sha256"] for s in manifest["shards"] if s["split"] == "train")

    with stage_run("train_tokenizer", cfg) as active, tempfile.TemporaryDirectory(prefix="vqpipe-train-") as staging:
        import mlflow

        job = Job(
            shards=str(paths.shards.resolve()),
            checkpoint_dir=str(paths.within(cfg.checkpoint_dir)),
            staging=staging,
            image_size=image_size,
            data_fingerprint=hashlib.sha256("".join(train_sums).encode()).hexdigest(),
            run_id=active.info.run_id,
            tracking_uri=absolute_tracking_uri(mlflow.get_tracking_uri()),
            perceptual_weights=str(Path(cfg.perceptual_weights).resolve()) if cfg.perceptual_weights else None,
        )
        if cfg.workers == 1:
            train_worker(cfg, job, rank=0, world_size=1, device=resolve_device(cfg.device))
        else:
            _train_on_ray(cfg, job)

        summary = json.loads((Path(staging) / "summary.json").read_text())
        tokenizer = Tokenizer.load(Path(staging) / "tokenizer")
        tokenizer.save(paths.tokenizer)
        write_json(paths.metrics / "train_tokenizer.json", summary)
        paths.plots.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(staging) / "train_tokenizer.csv", paths.plots / "train_tokenizer.csv")
        mlflow.log_metrics({f"final_{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
        mlflow.log_artifacts(str(paths.tokenizer), artifact_path="tokenizer")
        mlflow.set_tag("vqpipe.tokenizer_fingerprint", tokenizer.fingerprint)
        if cfg.registered_model:
            version = register_export(
                cfg.registered_model, active.info.run_id, "tokenizer", tokenizer.fingerprint, "vqpipe image tokenizers"
            )
            log.info("registered as MLflow model %s version %s", cfg.registered_model, version)
        log.info("tokenizer %s written to %s", tokenizer.fingerprint[:12], paths.tokenizer)
        return TrainTokenizerResult(paths.tokenizer, tokenizer.fingerprint, summary, active.info.run_id)


def build_model(cfg: TrainTokenizerConfig) -> nn.Module:
    """The autoencoder of `cfg.arch` (VQ-GAN's generator is a VQVAE)."""
    common = dict(
        channels=cfg.channels,
        num_downsamples=cfg.num_downsamples,
        num_res_blocks=cfg.num_res_blocks,
        latent_dim=cfg.latent_dim,
    )
    if cfg.arch == "vqvae2":
        return VQVAE2(
            quantizer=cfg.quantizer,
            top_quantizer=cfg.top_quantizer,
            top_downsamples=cfg.vqvae2.top_downsample.bit_length() - 1,
            **common,
        )
    return VQVAE(quantizer=cfg.quantizer, **common)


class TokenizerTrainer:
    """The optimisation step of every architecture: reconstruction (L1/L2, + LPIPS) and
    quantizer losses; for VQ-GAN the adaptive-weighted adversarial term and a discriminator
    step, both only after `disc_start` steps. `generator`/`discriminator` may be DDP- or
    compile-wrapped; `model`/`disc` are the plain modules."""

    def __init__(
        self,
        cfg: TrainTokenizerConfig,
        model: nn.Module,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        disc: nn.Module | None = None,
        lpips: LPIPS | None = None,
        lecam: LeCAM | None = None,
    ):
        self.cfg = cfg
        self.model = self.generator = model
        self.disc = self.discriminator = disc
        self.device = device
        self.amp_dtype = amp_dtype
        self.lpips = lpips
        self.lecam = lecam
        gan = cfg.arch == "vqgan"
        betas = (0.5, 0.9) if gan else (0.9, 0.999)  # taming-transformers' betas for GAN training
        self.opt_g = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
        self.opt_d = (
            torch.optim.Adam(disc.parameters(), lr=cfg.vqgan.disc_lr or cfg.lr, betas=betas)
            if disc is not None
            else None
        )

    def gan_active(self, step: int) -> bool:
        """Steps are counted from 1: with disc_start = k the discriminator first trains at step k + 1."""
        return self.disc is not None and step > self.cfg.vqgan.disc_start

    def _autocast(self):
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        )

    def step(self, images: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """One step on a uint8 batch (b, 3, H, W); returns detached scalars for logging."""
        cfg = self.cfg
        x = (to_float(images).to(self.device, non_blocking=True) * 2.0 - 1.0).contiguous(
            memory_format=torch.channels_last
        )
        with self._autocast():
            out = self.generator(x)
            rec = reconstruction_loss(cfg.recon_loss, out.reconstruction, x)
            parts = {"recon_loss": rec.detach()}
            if self.lpips is not None:
                perceptual = self.lpips(out.reconstruction.float(), x.float()).mean()
                rec = rec + cfg.perceptual_weight * perceptual
                parts["perceptual_loss"] = perceptual.detach()
        loss = rec + out.quant_loss
        gan = self.gan_active(step)
        if gan:
            self.disc.requires_grad_(False)
            with self._autocast():
                g_loss = generator_loss(cfg.vqgan.disc_loss, self.disc(out.reconstruction))
            weight = (
                adaptive_weight(rec, g_loss, self.model.last_layer, cfg.vqgan.adaptive_weight_max)
                * cfg.vqgan.disc_weight
            )
            loss = loss + weight * g_loss
            parts.update(g_loss=g_loss.detach(), adaptive_weight=weight)
            self.disc.requires_grad_(True)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()
        if gan:
            parts.update(self._disc_step(x, out.reconstruction.detach()))
        return {"loss": loss.detach(), **parts, **{k: v for k, v in out.parts.items() if k not in parts}}

    def _disc_step(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg.vqgan
        with self._autocast():
            # One forward of both halves: DDP expects one forward per backward (and GroupNorm
            # keeps the halves' statistics apart).
            logits = self.discriminator(torch.cat([real, fake.to(real.dtype)]))
        logits_real, logits_fake = logits.float().chunk(2)
        d_loss = discriminator_loss(cfg.disc_loss, logits_real, logits_fake)
        parts = {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
        if self.lecam is not None:
            penalty = self.lecam.penalty(logits_real, logits_fake)
            d_loss = d_loss + cfg.lecam_weight * penalty
            self.lecam.update(logits_real.detach(), logits_fake.detach())
            parts["lecam_penalty"] = penalty.detach()
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        return parts

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "optimizer": self.opt_g.state_dict()}
        if self.disc is not None:
            state.update(disc=self.disc.state_dict(), disc_optimizer=self.opt_d.state_dict())
        if self.lecam is not None:
            state["lecam"] = self.lecam.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt_g.load_state_dict(state["optimizer"])
        if self.disc is not None:
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["disc_optimizer"])
        if self.lecam is not None:
            self.lecam.load_state_dict(state["lecam"])


def build_trainer(
    cfg: TrainTokenizerConfig, device: torch.device, perceptual_weights: str | None = None
) -> TokenizerTrainer:
    model = build_model(cfg).to(
        device, memory_format=torch.channels_last
    )  # ~20% faster convolutions (oneDNN, tensor cores)
    disc = lecam = lpips = None
    if cfg.arch == "vqgan":
        disc = PatchDiscriminator(3, cfg.vqgan.disc_channels, cfg.vqgan.disc_layers).to(
            device, memory_format=torch.channels_last
        )
        if cfg.vqgan.lecam_weight > 0:
            lecam = LeCAM(cfg.vqgan.lecam_decay).to(device)
    if cfg.perceptual_weight > 0:
        lpips = LPIPS.load(perceptual_weights or cfg.perceptual_weights).to(device)
    return TokenizerTrainer(
        cfg, model, device, autocast_dtype(cfg.precision, device), disc=disc, lpips=lpips, lecam=lecam
    )


def train_worker(cfg: TrainTokenizerConfig, job: Job, rank: int, world_size: int, device: torch.device) -> None:
    """The training loop of one worker (the only one when world_size is 1). Rank 0 logs to the
    MLflow run, writes the checkpoints and finally the export into job.staging."""
    import mlflow

    seed_everything(cfg.seed)  # identical initial weights on every rank
    trainer = build_trainer(cfg, device, job.perceptual_weights)
    per_rank = cfg.batch_size // world_size
    loader_workers = cfg.num_workers
    roles = world_size * max(loader_workers, 1)
    settings = {**cfg.training_settings(), "image_size": job.image_size, "data": job.data_fingerprint}

    start, history, data_start, previous_run = _restore(
        cfg, job, trainer, settings, rank, world_size, roles, per_rank, device
    )
    if rank > 0 and start == 0:
        torch.manual_seed(cfg.seed + 7919 * rank)  # replicas draw their own noise (dropout, Gumbel)

    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        # broadcast_buffers=False: the EMA codebooks are kept identical by the quantizers' own
        # all-reduces (tested), not by overwriting them with rank 0's.
        trainer.generator = DDP(trainer.model, device_ids=ids, broadcast_buffers=False)
        if trainer.disc is not None:
            trainer.discriminator = DDP(trainer.disc, device_ids=ids, broadcast_buffers=False)
    if cfg.compile:
        compile_convolutions(trainer)

    # A stream that cannot be replayed exactly continues on fresh samples instead.
    loader = build_loader(
        cfg,
        job.shards,
        per_rank,
        rank,
        world_size,
        start_batch=data_start or 0,
        seed=cfg.seed if data_start is not None else cfg.seed + start,
        pin_memory=device.type == "cuda",
    )
    lead = rank == 0
    metrics = monitor = None
    if lead:
        mlflow.set_tracking_uri(job.tracking_uri)
        metrics = MetricLogger(job.run_id, flush_every=cfg.log_every)
        metrics.history = history
        model = trainer.model
        params = {
            "model.parameters": sum(p.numel() for p in model.parameters()),
            "data.image_size": job.image_size,
            "train.autocast_dtype": str(trainer.amp_dtype or torch.float32),
            "train.world_size": world_size,
            "train.device": str(device),
        }
        if trainer.disc is not None:
            params["disc.parameters"] = sum(p.numel() for p in trainer.disc.parameters())
        metrics.client.log_batch(job.run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()])
        if start:
            # The steps before `start` were logged to the run that wrote the checkpoint.
            metrics.client.set_tag(job.run_id, "vqpipe.resumed_from_step", str(start))
            metrics.client.set_tag(job.run_id, "vqpipe.resumed_from_run", previous_run)
        monitor = _system_metrics(job)
        val_images = to_float(load_split(job.shards, "val", limit=VAL_IMAGES)[0])

    started, step, parts, val = time.perf_counter(), start, {}, {}
    batches = None
    try:
        batches = iter(loader)
        while step < cfg.steps:
            images, _labels = next(batches)
            step += 1
            parts = trainer.step(images, step)
            if lead:
                lrs = {"lr": trainer.opt_g.param_groups[0]["lr"]}
                if trainer.opt_d is not None:
                    lrs["lr_disc"] = trainer.opt_d.param_groups[0]["lr"]
                metrics.log(step, {**{k: v.item() for k, v in parts.items()}, **lrs})
                if step % cfg.val_every == 0 or step == cfg.steps:
                    val = _validate(trainer.model, val_images, device)
                    metrics.log(step, {"val_psnr": val["psnr"], "val_ssim": val["ssim"]})
                    metrics.client.log_image(job.run_id, val["grid"], key="reconstructions", step=step)
                    log.info(
                        "step %d/%d  loss %.4f  usage %.1f%%  perplexity %.1f  val PSNR %.2f dB  (%.1f steps/s)",
                        step,
                        cfg.steps,
                        parts["loss"].item(),
                        parts["codebook_usage"].item(),
                        parts["perplexity"].item(),
                        val["psnr"],
                        (step - start) / (time.perf_counter() - started),
                    )
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _checkpoint(job, trainer, settings, step, step == cfg.steps, roles, per_rank, metrics, world_size)
    finally:
        # Stop the loader's worker processes now, not whenever the iterator is collected.
        shutdown = getattr(batches, "_shutdown_workers", None)  # only multi-process iterators have it
        if shutdown is not None:
            try:
                shutdown()
            except RuntimeError as err:  # a loader process that ended badly while being stopped
                log.warning("stopping the data loader: %s", err)
        if monitor is not None:
            monitor.finish()
    identical = _replicas_identical(trainer, world_size)
    if not lead:
        return
    if not identical:
        log.warning("the replicas' weights or codebooks differ at the end of training")
    metrics.flush()
    elapsed = time.perf_counter() - started
    staging = Path(job.staging)
    model = trainer.model
    export = Tokenizer(_cpu_copy(model), export_config(cfg, job.image_size))
    export.save(staging / "tokenizer")
    summary = {
        "steps": cfg.steps,
        "resumed_from_step": start,
        "steps_per_second": (cfg.steps - start) / elapsed if cfg.steps > start else None,
        "images_per_second": (cfg.steps - start) * cfg.batch_size / elapsed if cfg.steps > start else None,
        "workers": world_size,
        "replicas_identical": identical,
        "val_psnr": metrics.last("val_psnr"),
        "val_ssim": metrics.last("val_ssim"),
        "train_loss": metrics.last("loss"),
        "train_codebook_usage": metrics.last("codebook_usage"),
        "train_perplexity": metrics.last("perplexity"),
    }
    write_json(staging / "summary.json", summary)
    metrics.write_csv(staging / "train_tokenizer.csv", PLOT_KEYS)


def compile_convolutions(trainer: TokenizerTrainer) -> None:
    """torch.compile the convolutional parts in place (`Module.compile`: state-dict names, and so
    checkpoints and exports, stay the same). The quantizers stay eager: their search is no-grad,
    data-dependent and fp32 by design, and inductor in torch 2.13 fails on it."""
    quantizers = set(map(id, trainer.model.quantizers.values()))
    for child in trainer.model.children():
        if id(child) not in quantizers:
            child.compile()
    if trainer.disc is not None:
        # The adaptive weight differentiates the reconstruction and adversarial losses with
        # retain_graph=True, which compiled backwards with donated buffers refuse.
        import torch._functorch.config

        torch._functorch.config.donated_buffer = False
        trainer.disc.compile()


def build_loader(
    cfg: TrainTokenizerConfig,
    shards: str | Path,
    per_rank: int,
    rank: int = 0,
    world_size: int = 1,
    start_batch: int = 0,
    seed: int | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """Endless uint8 training batches from the train shards, decoded in `cfg.num_workers`
    DataLoader processes (components/data/stream.py: split, shuffling, resuming)."""
    workers = cfg.num_workers
    stream = TrainingStream(
        shard_paths(shards, "train"),
        per_rank,
        shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed if seed is None else seed,
        rank=rank,
        world_size=world_size,
        loader_workers=workers,
        start_batch=start_batch,
    )
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
        pin_memory=pin_memory,
        # Its own generator: the loader must not draw from the global RNG, which a resumed run restores.
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def _replicas_identical(trainer: TokenizerTrainer, world_size: int) -> bool:
    """Whether every rank holds the same weights and buffers (EMA codebooks, their counts):
    a sha256 of each rank's state, compared on all."""
    if world_size == 1:
        return True
    import torch.distributed as dist

    state = {
        f"{prefix}.{name}": tensor
        for prefix, module in (("model", trainer.model), ("disc", trainer.disc), ("lecam", trainer.lecam))
        if module is not None
        for name, tensor in module.state_dict().items()
    }
    digests: list = [None] * world_size
    dist.all_gather_object(digests, state_fingerprint({}, state))
    return len(set(digests)) == 1


def _cpu_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format)


def _system_metrics(job: Job):
    """CPU, memory, GPU, disk and network of the lead worker's machine, every 10 s, into the run."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(job.run_id, sampling_interval=10, tracking_uri=job.tracking_uri)
        monitor.start()
        return monitor
    except Exception as err:  # psutil missing, or an unsupported platform: training goes on
        log.warning("system metrics not logged: %s", err)
        return None


def _restore(
    cfg,
    job: Job,
    trainer: TokenizerTrainer,
    settings: dict,
    rank: int,
    world_size: int,
    roles: int,
    per_rank: int,
    device,
):
    """(start step, metric history, data position or None, MLflow run of the checkpoint) from
    job.checkpoint_dir's checkpoint."""
    path = Path(job.checkpoint_dir)
    fresh = 0, [], 0, ""
    if not cfg.resume:
        return fresh
    state = load_checkpoint(path, map_location=device)
    if state is None:
        return fresh
    diffs = compare_settings(state["settings"], settings)
    if state["complete"] and (diffs or state["step"] >= cfg.steps):
        # A finished run's checkpoint: its result is the stage's output (and in DVC's cache).
        # It is extended when only `steps` grew, else this is another run: start over.
        if rank == 0:
            log.info("checkpoint in %s is of a finished run (step %d); starting over", path, state["step"])
        return fresh
    if diffs:
        raise CheckpointMismatch(
            f"{path} holds an unfinished run (step {state['step']}) with other training settings:\n  "
            + "\n  ".join(diffs)
            + f"\nTo resume it, set those back; to start over, delete {path} or set train_tokenizer.resume: false."
        )
    trainer.load_state_dict(state)
    rngs = state["rng"]
    if len(rngs) == world_size:
        set_rng_state(rngs[rank])
    else:
        torch.manual_seed(cfg.seed + 7919 * rank + state["step"])
    exact = state["roles"] == roles and state["batch_per_rank"] == per_rank
    if rank == 0:
        log.info(
            "resuming from %s at step %d%s",
            path,
            state["step"],
            ""
            if exact
            else " (workers or batch layout changed: continuing on fresh samples rather than the exact data position)",
        )
    return (
        state["step"],
        list(state.get("history", [])),
        state["step"] if exact else None,
        state.get("mlflow_run_id", ""),
    )


def _checkpoint(
    job: Job,
    trainer: TokenizerTrainer,
    settings: dict,
    step: int,
    complete: bool,
    roles: int,
    per_rank: int,
    metrics,
    world_size: int,
) -> None:
    rng = rng_state()
    if world_size > 1:
        import torch.distributed as dist

        rngs: list = [None] * world_size
        dist.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    if metrics is None:
        return
    save_checkpoint(
        job.checkpoint_dir,
        {
            **trainer.state_dict(),
            "step": step,
            "complete": complete,
            "settings": settings,
            "roles": roles,
            "batch_per_rank": per_rank,
            "rng": rngs,
            "history": metrics.history,
            "mlflow_run_id": job.run_id,
        },
    )


@torch.no_grad()
def _validate(model: nn.Module, images: torch.Tensor, device: torch.device) -> dict:
    model.eval()
    recon = []
    for start in range(0, images.shape[0], 256):
        x = images[start : start + 256].to(device) * 2.0 - 1.0
        recon.append(((model(x).reconstruction.float() + 1.0) / 2.0).clamp(0, 1).cpu())
    model.train()
    recon_all = torch.cat(recon)
    n = min(GRID_IMAGES, images.shape[0])
    # Originals on the top row, their reconstructions under them.
    grid = make_grid(torch.cat([images[:n], recon_all[:n]]), nrow=n, upscale=2)
    return {"psnr": psnr(recon_all, images).mean().item(), "ssim": ssim(recon_all, images).mean().item(), "grid": grid}


def _train_on_ray(cfg: TrainTokenizerConfig, job: Job) -> None:
    train_on_ray(
        _ray_worker,
        cfg,
        asdict(job),
        stage="train_tokenizer",
        workers=cfg.workers,
        use_gpu=cfg.use_gpu,
        checkpoint_dir=job.checkpoint_dir,
        staging=job.staging,
    )


def _ray_worker(cfg: dict, job: dict, staging: str, rank: int, world_size: int, device: torch.device) -> None:
    train_worker(
        TrainTokenizerConfig.model_validate(cfg), replace(Job(**job), staging=staging), rank, world_size, device
    )


def main() -> None:
    stage_main("train_tokenizer", run)


if __name__ == "__main__":
    main()
