"""Stage `sample`: images drawn from the prior (KV-cached) and decoded by the tokenizer.

    dvc repro sample          # or: python -m pipelines.sample

Writes samples/grid.png: one row per class for a class-conditional prior, one row per prompt
for a text-conditional one (`sample.prompts`, else the captions it was trained without),
`sample.num_images` for an unconditional one. Logged to MLflow as an image.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from components.config import SampleConfig, SamplingOptions
from components.data.captions import caption_matrix
from components.metrics import make_grid, save_grid
from components.priors import HierarchicalPrior, Sampler, TransformerPrior, load_prior, sample_images
from components.tokenizers import Tokenizer
from pipelines.runtime import Paths, resolve_device, seed_everything, stage_main
from pipelines.tracking import fetch_export, stage_run

log = logging.getLogger("vqpipe.sample")


@dataclass
class SampleResult:
    grid_path: Path
    images: torch.Tensor  # (n, 3, H, W) in [0, 1]
    labels: torch.Tensor | None
    tokens_per_second: float


def run(cfg: SampleConfig, paths: Paths = Paths()) -> SampleResult:
    generator = seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    tokenizer = Tokenizer.load(paths.tokenizer, device=device)
    prior, meta = load_prior(paths.prior, device=device, tokenizer=tokenizer)

    with stage_run("sample", cfg) as active:
        import mlflow

        num_classes = prior.num_classes
        prompts = stage_prompts(cfg, prior, meta)
        if prompts:
            labels = prompt_condition(prior, [p for p in prompts for _ in range(cfg.num_per_class)])
            per_row = cfg.num_per_class
        elif num_classes:
            labels = torch.arange(num_classes).repeat_interleave(cfg.num_per_class)
            per_row = cfg.num_per_class
        else:  # unconditional (a text prior without prompts: the empty caption)
            labels = prior.null_condition(cfg.num_images) if prior.conditioning == "text" else None
            per_row = math.ceil(math.sqrt(cfg.num_images))
        n = len(labels) if labels is not None else cfg.num_images

        sampler = Sampler(prior, cfg.sampling, generator)
        images, tokens, seconds = sample_images(sampler, tokenizer, n, labels, cfg.batch_size)

        grid_path = paths.samples / "grid.png"
        grid = save_grid(images, grid_path, nrow=per_row, upscale=2)
        tokens_per_second = tokens.numel() / seconds
        mlflow.log_image(grid, key="samples")
        if prompts:
            mlflow.log_dict({"rows": prompts}, "samples/prompts.json")
        elif labels is not None:  # one grid per class too, to compare classes across runs in MLflow
            names = meta.get("class_names") or [str(c) for c in range(num_classes)]
            for c in range(num_classes):
                mlflow.log_image(
                    make_grid(images[labels == c], nrow=per_row, upscale=2), key=f"samples_class_{c}_{names[c]}"
                )
        mlflow.log_artifact(str(grid_path))
        mlflow.log_metrics({"images": n, "tokens_per_second": tokens_per_second})
        rows = f"one row per class: {', '.join(meta['class_names'])}" if num_classes and meta.get("class_names") else ""
        if prompts:
            rows = "one row per prompt: " + "; ".join(repr(p) for p in prompts)
        log.info(
            "%d samples (%.0f tokens/s) in %s %s (run %s)", n, tokens_per_second, grid_path, rows, active.info.run_id
        )
        return SampleResult(grid_path, images, labels, tokens_per_second)


def stage_prompts(cfg: SampleConfig, prior, meta: dict) -> list[str]:
    """A text prior's grid rows: `sample.prompts`, else the captions it was trained without
    (none: it samples unconditionally); [] for other priors (a ValueError when prompts are set)."""
    if prior.conditioning != "text":
        if cfg.prompts:
            raise ValueError(f"sample.prompts needs a text-conditional prior; this one is {prior.conditioning}")
        return []
    return list(cfg.prompts or meta.get("text", {}).get("held_out_captions", []))


def prompt_condition(prior, prompts: list[str | None]) -> torch.Tensor:
    """A text prior's condition for one prompt per sample: (n, T) caption ids ('' or None: the
    unconditional empty caption). ValueError for a prior that reads no text."""
    if prior.conditioning != "text":
        what = "class-conditional: use --class" if prior.conditioning == "class" else "unconditional"
        raise ValueError(f"a prompt needs a text-conditional prior; this one is {what}")
    return caption_matrix(prompts, prior.null_condition(1).shape[-1])


@dataclass
class Drawn:
    images: torch.Tensor  # (n, 3, H, W) in [0, 1]
    tokens: torch.Tensor  # (n, L)
    labels: torch.Tensor | None
    tokens_per_second: float
    class_names: list[str] | None


@dataclass
class SampleRequest:
    """What `vqpipe sample` asks for: n images of a class (an id, a name, or None: every class
    in turn) or, from a text prior, of a prompt; drawn with `options` from a generator seeded
    with `seed`, `batch_size` at a time."""

    n: int
    seed: int
    batch_size: int
    class_: str | int | None = None
    prompt: str | None = None
    options: SamplingOptions = field(default_factory=SamplingOptions)


@dataclass
class Models:
    prior: TransformerPrior | HierarchicalPrior
    tokenizer: Tokenizer
    class_names: list[str] | None


def resolve_class(value: str | int | None, num_classes: int, class_names: list[str] | None) -> int | None:
    """A class given by id or by name -> its id; ValueError naming the choices when it is none."""
    if value is None:
        return None
    if not num_classes:
        raise ValueError(f"--class {value}: the prior is unconditional (trained without labels)")
    names = class_names or []
    if isinstance(value, str) and not value.lstrip("-").isdigit():
        if value not in names:
            raise ValueError(f"no class named {value!r} (classes: {', '.join(names) or 'unnamed'})")
        return names.index(value)
    index = int(value)
    if not 0 <= index < num_classes:
        listed = f": {', '.join(f'{i}={n}' for i, n in enumerate(names))}" if names else ""
        raise ValueError(f"class {index} out of range [0, {num_classes}){listed}")
    return index


def load_models(
    prior_spec: str,
    tokenizer_spec: str | None = None,
    device: str = "auto",
    default_tokenizer: str = "models/tokenizer",
    root: str | Path = ".",
) -> Models:
    """A prior (an export directory or an MLflow URI such as `models:/vqpipe-prior@champion`)
    and its tokenizer (default: the one registered with the prior, else `default_tokenizer`);
    MLflow URIs are looked up in the project `root`'s store unless MLFLOW_TRACKING_URI is set."""
    dev = resolve_device(device)
    with tempfile.TemporaryDirectory(prefix="vqpipe-sample-") as tmp:
        prior_dir = fetch_export(prior_spec, Path(tmp) / "prior", "prior", root)
        if tokenizer_spec is None:
            bundled = prior_dir / "tokenizer"
            tokenizer_spec = str(bundled) if (bundled / "config.json").is_file() else default_tokenizer
        tokenizer_dir = fetch_export(tokenizer_spec, Path(tmp) / "tokenizer", "tokenizer", root)
        tokenizer = Tokenizer.load(tokenizer_dir, device=dev)
        prior, meta = load_prior(prior_dir, device=dev, tokenizer=tokenizer)
    return Models(prior, tokenizer, meta.get("class_names"))


def draw(models: Models, request: SampleRequest) -> Drawn:
    """`request.n` images from `models`. A conditional prior with no class given samples the
    classes round-robin. Every setting is checked before anything is sampled."""
    if request.n < 1:
        raise ValueError(f"n must be >= 1, got {request.n}")
    prior, n = models.prior, request.n
    if prior.conditioning == "text" or request.prompt is not None:
        if request.class_ is not None:
            raise ValueError("a text-conditional prior draws for --prompt TEXT, not --class")
        if request.prompt is None:
            raise ValueError("this prior is text-conditional: give --prompt TEXT ('' draws unconditionally)")
        labels = prompt_condition(prior, [request.prompt] * n)
        sampler = Sampler(prior, request.options, seed_everything(request.seed))
        images, tokens, seconds = sample_images(sampler, models.tokenizer, n, labels, request.batch_size)
        return Drawn(images, tokens, None, tokens.numel() / seconds, models.class_names)
    index = resolve_class(request.class_, prior.num_classes, models.class_names)
    labels = None
    if prior.num_classes:
        labels = torch.full((n,), index) if index is not None else torch.arange(n) % prior.num_classes
    sampler = Sampler(prior, request.options, seed_everything(request.seed))
    images, tokens, seconds = sample_images(sampler, models.tokenizer, n, labels, request.batch_size)
    return Drawn(images, tokens, labels, tokens.numel() / seconds, models.class_names)


def main() -> None:
    stage_main("sample", run)


if __name__ == "__main__":
    main()
