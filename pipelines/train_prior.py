"""Stage `train_prior`: a causal transformer over the token shards (raster order).

    dvc repro train_prior          # or: python -m pipelines.train_prior

Class-conditional through a prepended class token when the tokens carry labels, with label
dropout so the same model samples unconditionally and with classifier-free guidance.
Checkpoints every `checkpoint_every` steps in `checkpoint_dir` and resumes a killed run
exactly, like train_tokenizer. For a
VQ-VAE-2 tokenizer, a top prior and a bottom prior conditioned on the top tokens (one joint
loss, the mean over all tokens). Reads the Parquet parts with pyarrow (columnar, no per-row
Python) and refuses parts made by another tokenizer. Writes models/prior/{config.json,
model.safetensors}, metrics/train_prior.json and plots/train_prior.csv; logs train/val bits per
token to MLflow.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from components.checkpoint import CheckpointMismatch, compare_settings, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from components.config import TrainPriorConfig
from components.data import tokens as token_io
from components.io import write_json
from components.metrics import bits_per_token
from components.priors import build_prior, save_prior
from components.tokenizers import Tokenizer
from pipelines.common import MetricLogger, Paths, autocast_dtype, register_export, resolve_device, seed_everything, stage_main, stage_run

log = logging.getLogger("vqpipe.train_prior")


@dataclass
class TrainPriorResult:
    out_dir: Path
    metrics: dict
    run_id: str  # the stage's MLflow run


def run(cfg: TrainPriorConfig, paths: Paths = Paths()) -> TrainPriorResult:
    generator = seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    tokenizer = Tokenizer.load(paths.tokenizer)
    train = token_io.read_tokens(token_io.split_parts(paths.tokens, "train"), fingerprint=tokenizer.fingerprint)
    val = token_io.read_tokens(token_io.split_parts(paths.tokens, "val"), fingerprint=tokenizer.fingerprint)
    class_names = token_io.read_manifest(paths.tokens).get("classes")

    with stage_run("train_prior", cfg) as active:
        import mlflow

        model = _build_model(cfg, tokenizer, train, class_names).to(device)
        optimizer = _build_optimizer(cfg, model)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(cfg))
        tokens = torch.from_numpy(train.tokens)
        labels = torch.from_numpy(train.labels) if model.num_classes else None
        val_tokens = torch.from_numpy(val.tokens)
        val_labels = torch.from_numpy(val.labels) if model.num_classes else None
        metrics = MetricLogger(active.info.run_id, flush_every=cfg.log_every)
        mlflow.log_params(
            {
                "model.parameters": sum(p.numel() for p in model.parameters()),
                "model.kind": type(model).__name__,
                "data.train_rows": len(tokens),
                "data.num_classes": model.num_classes,
            }
        )
        amp = autocast_dtype(cfg.precision, device) if device.type == "cuda" else None
        settings = {**cfg.training_settings(), "tokenizer": tokenizer.fingerprint, "data": hashlib.sha256(train.tokens.tobytes()).hexdigest()}
        ckpt_dir = Path(cfg.checkpoint_dir) if Path(cfg.checkpoint_dir).is_absolute() else (paths.root / cfg.checkpoint_dir).resolve()
        start = _restore(cfg, ckpt_dir, settings, model, optimizer, schedule, generator, metrics, device)
        if start:
            mlflow.set_tag("vqpipe.resumed_from_step", str(start))

        started = time.perf_counter()
        val_bits = metrics.last("val_bits_per_token") or float("nan")
        model.train()
        for step in range(start + 1, cfg.steps + 1):
            batch = torch.randint(0, len(tokens), (cfg.batch_size,), generator=generator)
            batch_labels = None
            if labels is not None:
                batch_labels = labels[batch]
                dropped = torch.rand(cfg.batch_size, generator=generator) < cfg.label_dropout
                batch_labels = torch.where(dropped, torch.full_like(batch_labels, -1), batch_labels).to(device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = model.loss(tokens[batch].to(device), batch_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            schedule.step()
            metrics.log(step, {"train_bits_per_token": loss.item() / math.log(2), "lr": schedule.get_last_lr()[0]})
            if step % cfg.val_every == 0 or step == cfg.steps:
                val_bits = bits_per_token(model, val_tokens, val_labels)
                metrics.log(step, {"val_bits_per_token": val_bits})
                log.info("step %d/%d  train %.3f  val %.3f bits/token  (%.1f steps/s)", step, cfg.steps, loss.item() / math.log(2), val_bits, (step - start) / (time.perf_counter() - started))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _checkpoint(ckpt_dir, settings, model, optimizer, schedule, generator, metrics, step, complete=step == cfg.steps)
        metrics.flush()

        save_prior(paths.prior, model.cpu(), tokenizer_fingerprint=tokenizer.fingerprint, grid=tokenizer.column_grids, class_names=class_names)
        summary = {
            "steps": cfg.steps,
            "resumed_from_step": start,
            "steps_per_second": (cfg.steps - start) / max(time.perf_counter() - started, 1e-9),
            "train_bits_per_token": metrics.last("train_bits_per_token"),
            "val_bits_per_token": val_bits,
        }
        write_json(paths.metrics / "train_prior.json", summary)
        metrics.write_csv(paths.plots / "train_prior.csv", ["train_bits_per_token", "val_bits_per_token"])
        mlflow.log_metrics({f"final_{k}": v for k, v in summary.items()})
        mlflow.log_artifacts(str(paths.prior), artifact_path="prior")
        # The tokenizer travels with the prior in MLflow: `models:/vqpipe-prior@alias` samples alone.
        mlflow.log_artifacts(str(paths.tokenizer), artifact_path="prior/tokenizer")
        if cfg.registered_model:
            version = register_export(cfg.registered_model, active.info.run_id, "prior", tokenizer.fingerprint, "vqpipe priors (with their tokenizer)")
            log.info("registered as MLflow model %s version %s", cfg.registered_model, version)
        log.info("prior written to %s", paths.prior)
        return TrainPriorResult(paths.prior, summary, active.info.run_id)


def _build_model(cfg: TrainPriorConfig, tokenizer: Tokenizer, train: token_io.TokenData, class_names):
    if train.tokens.shape[1] != tokenizer.num_tokens:
        raise ValueError(f"token rows have {train.tokens.shape[1]} tokens, the tokenizer makes {tokenizer.num_tokens}")
    labelled = train.labels is not None and (train.labels >= 0).any()
    num_classes = 0
    if labelled:
        num_classes = len(class_names) if class_names else int(train.labels.max()) + 1
    return build_prior(
        tokenizer, num_classes=num_classes, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
        dropout=cfg.dropout, norm=cfg.norm, tie_weights=cfg.tie_weights,
    )


def _restore(cfg: TrainPriorConfig, ckpt_dir: Path, settings: dict, model, optimizer, schedule, generator, metrics: MetricLogger, device) -> int:
    """The step to start from: that of an unfinished checkpoint of the same settings in
    `ckpt_dir` (model, optimizer, schedule, the batch sampler's and every RNG state, the
    metric history), or of a finished one when only `steps` grew; else 0. An unfinished
    checkpoint of other settings is refused, naming them."""
    if not cfg.resume:
        return 0
    state = load_checkpoint(ckpt_dir, map_location=device)
    if state is None:
        return 0
    diffs = compare_settings(state["settings"], settings)
    if state["complete"] and (diffs or state["step"] >= cfg.steps):
        log.info("checkpoint in %s is of a finished run (step %d); starting over", ckpt_dir, state["step"])
        return 0
    if diffs:
        raise CheckpointMismatch(
            f"{ckpt_dir} holds an unfinished prior run (step {state['step']}) with other settings:\n  "
            + "\n  ".join(diffs)
            + f"\nTo resume it, set those back; to start over, delete {ckpt_dir} or set train_prior.resume: false."
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    generator.set_state(state["sampler"])
    set_rng_state(state["rng"])
    metrics.history = list(state["history"])
    log.info("resuming from %s at step %d", ckpt_dir, state["step"])
    return state["step"]


def _checkpoint(ckpt_dir: Path, settings: dict, model, optimizer, schedule, generator, metrics: MetricLogger, step: int, complete: bool) -> None:
    save_checkpoint(
        ckpt_dir,
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "sampler": generator.get_state(),
            "rng": rng_state(),
            "history": metrics.history,
            "step": step,
            "complete": complete,
            "settings": settings,
        },
    )


def _build_optimizer(cfg: TrainPriorConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    # Weight decay on matrices only: decaying norms, biases and embeddings hurts small models.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "emb" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def _warmup_cosine(cfg: TrainPriorConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def main() -> None:
    stage_main("train_prior", run)


if __name__ == "__main__":
    main()
