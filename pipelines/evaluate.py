"""Stage `evaluate`: reconstruction, codebook, prior and generation metrics on the validation split.

    dvc repro evaluate          # or: python -m pipelines.evaluate

Writes metrics/evaluate.json: reconstruction PSNR and SSIM (on the uint8-rounded images a user
gets back), rFID (the Fréchet distance between the validation images' and their reconstructions'
features, whole split: Inception-v3 when `inception_weights` is given, else a seeded random
Inception-v3, named by `rfid_feature_space`) and, with `perceptual_weights`, LPIPS; codebook
usage % and perplexity of the validation tokens, their unigram entropy against the prior's bits
per token; for `num_samples` images drawn
from the prior, FID and precision/recall against the validation images (in Inception space
when `inception_weights` is given, else in the tokenizer encoder's, named by
`feature_space`) and, for a labelled dataset, class consistency: the share of samples a small
classifier trained on the validation images assigns to the class they were drawn for. Also
eval/reconstructions.png (originals above their reconstructions), with `write_npz` the images
as ADM-style .npz files (eval/references.npz, eval/reconstructions.npz, eval/samples.npz), and
plots/codebook_usage.csv; logs all to MLflow.

Everything streams: tokens a record batch at a time, images a batch at a time, samples a batch
at a time. Metrics are sums over batches; FID and rFID come from running feature moments; the features
precision/recall compares are kept in memory up to `feature_memory_mb`, then spilled to a
memory-mapped file, and compared in blocks. The judge trains from a shuffled stream of the
validation shards. Memory is bounded by a batch, whatever the split's size; the whole split is
evaluated unless `max_images` caps it (recorded as `val_images`).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from components.config import EvaluateConfig, Params
from components.data import shapes
from components.data import tokens as token_io
from components.data.captions import caption_matrix
from components.data.shards import assign_split, shard_paths, split_batches, to_float
from components.data.shards import read_manifest as read_shard_manifest
from components.data.stream import StreamLayout, TrainingStream
from components.io import write_json
from components.metrics import CodeCounts, PriorBits, make_grid, psnr, ssim
from components.metrics.generation import (
    FeatureMoments,
    FeatureStore,
    classifier_accuracy,
    fit_classifier,
    frechet_from_moments,
    precision_recall,
    tokenizer_features,
)
from components.metrics.inception import (
    feature_space_name,
    inception_features,
    load_inception,
    random_inception,
    random_inception_size,
)
from components.metrics.npz import NpzWriter
from components.metrics.reconstruction import as_uint8_images
from components.priors import MaskGITPrior, Sampler, image_batches, load_prior
from components.tokenizers import Tokenizer
from components.tokenizers.lpips import LPIPS
from pipelines.registry import promote_models
from pipelines.runtime import Paths, resolve_device, stage_main
from pipelines.tracking import shards_input, stage_run, tokens_input

log = logging.getLogger("vqpipe.evaluate")
GRID_COLUMNS = 16
JUDGE_HELD_OUT = 0.2  # share of the labelled validation images the judge is tested on, not trained on
JUDGE_BATCH, JUDGE_BUFFER = 64, 512


@dataclass
class EvaluateResult:
    metrics: dict
    metrics_path: Path
    run_id: str  # the stage's MLflow run


@dataclass
class RealImages:
    """What one pass over the validation images gathers."""

    count: int = 0
    psnr_sum: float = 0.0
    ssim_sum: float = 0.0
    lpips_sum: float = 0.0
    labelled: int = 0
    largest_label: int = -1
    originals: list[torch.Tensor] = field(default_factory=list)  # the grid's first 2 x GRID_COLUMNS
    reconstructions: list[torch.Tensor] = field(default_factory=list)
    moments: FeatureMoments = field(default_factory=FeatureMoments)
    features: FeatureStore | None = None
    # rFID: the validation images' and their reconstructions' features in the rFID space.
    rfid_real: FeatureMoments = field(default_factory=FeatureMoments)
    rfid_recon: FeatureMoments = field(default_factory=FeatureMoments)

    def metrics(self, spaces: Spaces) -> dict:
        out = {"val_images": self.count, "psnr": self.psnr_sum / self.count, "ssim": self.ssim_sum / self.count}
        if self.count >= 2:  # a covariance needs two images
            out["rfid"] = frechet_from_moments(self.rfid_real, self.rfid_recon)
            out["rfid_feature_space"] = spaces.rfid.name
        if spaces.lpips is not None:
            out["lpips"] = self.lpips_sum / self.count
        return out


def run(cfg: EvaluateConfig, paths: Paths = Paths()) -> EvaluateResult:
    device = resolve_device(cfg.device)
    tokenizer = Tokenizer.load(paths.tokenizer, device=device)
    prior, prior_meta = load_prior(paths.prior, device=device, tokenizer=tokenizer)
    val_parts = token_io.split_parts(paths.tokens, "val")
    layout = token_io.check_parts(val_parts, tokenizer.fingerprint)[0]  # before any work, and once

    inputs = [shards_input(paths.shards, "evaluation"), tokens_input(paths.tokens, "evaluation")]
    with stage_run("evaluate", cfg, inputs) as active, tempfile.TemporaryDirectory(prefix="vqpipe-eval-") as scratch:
        import mlflow

        metrics = _token_metrics(cfg, tokenizer, prior, (val_parts, layout), paths.plots / "codebook_usage.csv")
        spaces = _spaces(cfg, tokenizer, device)
        real = _real_images(cfg, tokenizer, paths, spaces, Path(scratch))
        metrics.update(real.metrics(spaces))
        if not cfg.num_samples:
            (paths.eval / "samples.npz").unlink(missing_ok=True)  # an earlier evaluation's
        judge = None
        if cfg.num_samples:
            generated, judge = _generation_metrics(cfg, tokenizer, prior, real, spaces.fid, paths, Path(scratch))
            metrics.update(generated)
        metrics.update(_prompt_metrics(cfg, tokenizer, prior, prior_meta, (judge, real), paths))
        metrics_path = paths.metrics / "evaluate.json"
        write_json(metrics_path, metrics)
        grid = _reconstruction_grid(real)
        paths.eval.mkdir(parents=True, exist_ok=True)
        grid.save(paths.eval / "reconstructions.png")

        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        mlflow.set_tag("vqpipe.feature_space", metrics.get("feature_space", "none"))
        mlflow.set_tag("vqpipe.rfid_feature_space", metrics.get("rfid_feature_space", "none"))
        mlflow.set_tag("vqpipe.prior_kind", metrics["prior_kind"])
        mlflow.set_tag("vqpipe.prior_condition", prior.conditioning)
        if "prompts_evaluated" in metrics:
            mlflow.log_artifact(str(paths.eval / "prompts.json"))
            mlflow.log_image(Image.open(paths.eval / "prompts.png"), key="held_out_prompts")
        mlflow.log_image(grid, key="reconstructions")
        mlflow.log_artifact(str(metrics_path))
        _log_summary(metrics, active.info.run_id)
        return EvaluateResult(metrics, metrics_path, active.info.run_id)


def _token_metrics(cfg: EvaluateConfig, tokenizer: Tokenizer, prior, val: tuple, usage_csv: Path) -> dict:
    """Codebook usage and perplexity of the validation tokens (`val`: the parts and their
    layout) and the prior's bits per token against their unigram entropy, a record batch at a
    time; writes the usage CSV."""
    parts, info = val
    counts, bits = CodeCounts(tokenizer.column_codebook_sizes), PriorBits(prior)
    text = prior.conditioning == "text"
    for batch in token_io.iter_token_batches(parts, cfg.batch_size, captions=text):
        counts.add({c: token_io.column_of(batch.tokens, c, info.tiers, info.grid) for c in info.grid})
        if text:
            condition = caption_matrix(batch.captions, _caption_slots(prior))
        else:
            condition = torch.from_numpy(batch.labels) if prior.num_classes else None
        bits.add(torch.from_numpy(batch.tokens), condition)
    _write_usage_csv(usage_csv, counts, tokenizer.codebook_size)
    stats = counts.stats()
    return {
        "codebook_usage": stats["codebook_usage"],
        "perplexity": stats["perplexity"],
        "unigram_bits_per_token": stats["unigram_bits_per_token"],
        # A MaskGIT prior's: bits per hidden token (components/priors/maskgit.py), not a likelihood.
        "prior_bits_per_token": bits.bits,
        "prior_kind": "maskgit" if isinstance(prior, MaskGITPrior) else "ar",
        # How much the prior knows beyond code frequencies.
        "prior_gain_bits_per_token": stats["unigram_bits_per_token"] - bits.bits,
    }


@dataclass
class FeatureSpace:
    name: str
    features: Callable[[torch.Tensor], np.ndarray]  # (b, 3, H, W) in [0, 1] -> (b, d)


@dataclass
class Spaces:
    """Where evaluate compares images: `fid` the samples' space (None without samples), `rfid`
    the reconstructions', `lpips` the LPIPS network (None without its weights)."""

    fid: FeatureSpace | None
    rfid: FeatureSpace
    lpips: LPIPS | None


def _spaces(cfg: EvaluateConfig, tokenizer: Tokenizer, device) -> Spaces:
    """Inception-v3 from `inception_weights` for both FIDs when given. Without it, samples are
    compared in the tokenizer encoder's space (as before 0.5) and reconstructions in a seeded
    random Inception-v3's: an rFID in the evaluated tokenizer's own space would be blind to what
    it fails to encode."""
    lpips = LPIPS.load(cfg.perceptual_weights).to(device) if cfg.perceptual_weights else None
    if cfg.inception_weights:
        net = load_inception(cfg.inception_weights, device)
        inception = FeatureSpace("inception", lambda images: inception_features(net, images))
        return Spaces(inception if cfg.num_samples else None, inception, lpips)
    size = random_inception_size(tokenizer.image_size)
    random_net = random_inception(size, device=device)
    rfid = FeatureSpace(feature_space_name(size), lambda images: inception_features(random_net, images))
    fid = None
    if cfg.num_samples:
        fid = FeatureSpace("tokenizer_encoder", lambda images: tokenizer_features(tokenizer, images, cfg.batch_size))
    return Spaces(fid, rfid, lpips)


def _npz_writers(cfg: EvaluateConfig, paths: Paths, scratch: Path, *names: str) -> list[NpzWriter | None]:
    """With `write_npz`, a writer per name (eval/NAME.npz); without, None each, and an earlier
    run's file of that name is removed, so eval/ never holds images of another evaluation."""
    if not cfg.write_npz:
        for name in names:
            (paths.eval / f"{name}.npz").unlink(missing_ok=True)
        return [None] * len(names)
    return [NpzWriter(paths.eval / f"{name}.npz", scratch) for name in names]


def _real_images(cfg: EvaluateConfig, tokenizer: Tokenizer, paths: Paths, spaces: Spaces, scratch: Path) -> RealImages:
    """One pass over the validation images (up to max_images): reconstruction metrics (on the
    uint8-rounded reconstructions), rFID moments, the grid's images and, when samples are to be
    compared, the images' features; with `write_npz` both sets as .npz."""
    real = RealImages()
    space = spaces.fid
    if space is not None:
        real.features = FeatureStore(cfg.feature_memory_mb << 20, scratch)
    references, reconstructions = _npz_writers(cfg, paths, scratch, "references", "reconstructions")
    for raw, labels, _ in split_batches(paths.shards, "val", cfg.batch_size, limit=cfg.max_images):
        images = to_float(raw)
        recon = as_uint8_images(tokenizer.reconstruct(images).cpu())
        real.count += len(images)
        real.psnr_sum += psnr(recon, images).sum().item()
        real.ssim_sum += ssim(recon, images).sum().item()
        image_features = spaces.rfid.features(images)
        real.rfid_real.add(image_features)
        real.rfid_recon.add(spaces.rfid.features(recon))
        if spaces.lpips is not None:
            with torch.no_grad():
                device = tokenizer.device
                pair = (images.to(device) * 2 - 1, recon.to(device) * 2 - 1)
                real.lpips_sum += spaces.lpips(*pair).sum().item()
        if references is not None:
            references.add(raw)
            reconstructions.add(recon)
        real.labelled += int((labels >= 0).sum())
        real.largest_label = max(real.largest_label, int(labels.max()))
        room = 2 * GRID_COLUMNS - sum(len(t) for t in real.originals)
        if room > 0:
            real.originals.append(images[:room])
            real.reconstructions.append(recon[:room])
        if space is not None:
            # With Inception weights FID and rFID share the network: one forward pass serves both.
            features = image_features if space is spaces.rfid else space.features(images)
            real.moments.add(features)
            real.features.add(features)
    if not real.count:
        raise ValueError(f"no validation images in {paths.shards}")
    if references is not None:
        references.close()
        reconstructions.close()
    return real


def _reconstruction_grid(real: RealImages):
    """Rows of GRID_COLUMNS originals, each above its reconstructions."""
    images, recon = torch.cat(real.originals), torch.cat(real.reconstructions)
    step = GRID_COLUMNS
    rows = [t for i in range(0, len(images), step) for t in (images[i : i + step], recon[i : i + step])]
    return make_grid(torch.cat(rows), nrow=GRID_COLUMNS, upscale=2)


def _log_summary(metrics: dict, run_id: str) -> None:
    rfid = f"  rFID {metrics['rfid']:.4f} ({metrics['rfid_feature_space']})" if "rfid" in metrics else ""
    lpips = f"  LPIPS {metrics['lpips']:.4f}" if "lpips" in metrics else ""
    log.info(
        "PSNR %.2f dB  SSIM %.3f%s%s  codebook usage %.1f%%  perplexity %.1f  prior %.3f vs unigram %.3f bits/token",
        *(metrics["psnr"], metrics["ssim"], rfid, lpips),
        *(metrics["codebook_usage"], metrics["perplexity"]),
        *(metrics["prior_bits_per_token"], metrics["unigram_bits_per_token"]),
    )
    if "fid" in metrics:
        judged = "n/a"
        if "class_consistency" in metrics:
            judged = f"{metrics['class_consistency']:.3f} (judge {metrics['classifier_val_accuracy']:.3f})"
        log.info(
            "%d samples: FID %.3f (%s features)  precision %.3f  recall %.3f  class consistency %s",
            *(metrics["generated_images"], metrics["fid"], metrics["feature_space"]),
            *(metrics["precision"], metrics["recall"], judged),
        )
    log.info("evaluation logged to MLflow run %s", run_id)


def _caption_slots(prior) -> int:
    return prior.null_condition(1).shape[-1]


def _val_captions(paths: Paths, n: int) -> tuple[list[str | None], torch.Tensor]:
    """The captions and labels of the first n validation rows (again from the first when the
    split has fewer): what a text prior's samples are drawn for and judged against."""
    captions, labels = [], []
    for batch in token_io.iter_token_batches(token_io.split_parts(paths.tokens, "val"), 256, captions=True):
        captions += batch.captions[: n - len(captions)]
        labels += batch.labels[: n - len(labels)].tolist()
        if len(captions) >= n:
            break
    if not captions:
        raise ValueError(f"no validation token rows in {paths.tokens} to take captions from")
    repeat = -(-n // len(captions))
    return (captions * repeat)[:n], torch.tensor((labels * repeat)[:n], dtype=torch.long)


def _generation_metrics(
    cfg: EvaluateConfig, tokenizer: Tokenizer, prior, real: RealImages, space: FeatureSpace, paths: Paths, scratch
) -> tuple[dict, torch.nn.Module | None]:
    """FID, precision/recall and class consistency of `cfg.num_samples` samples, drawn and
    judged a batch at a time, against the validation images' features; with `write_npz` the
    samples as eval/samples.npz. A class prior's samples are drawn for the classes in turn, a
    text prior's for the validation rows' captions (and judged against those rows' classes).
    Also the judge (None without labels)."""
    shards = paths.shards
    (samples,) = _npz_writers(cfg, paths, scratch, "samples")
    generator = torch.Generator(tokenizer.device).manual_seed(cfg.seed)
    conditions = classes = None
    if prior.conditioning == "text":
        captions, classes = _val_captions(paths, cfg.num_samples)
        conditions = caption_matrix(captions, _caption_slots(prior))
    elif prior.num_classes:
        conditions = classes = torch.arange(cfg.num_samples) % prior.num_classes
    judge, accuracy = None, float("nan")
    if classes is not None and (classes >= 0).any() and real.labelled > 4:
        judge, accuracy = _train_judge(cfg, shards, max(prior.num_classes, real.largest_label + 1))
    moments, store = FeatureMoments(), FeatureStore(cfg.feature_memory_mb << 20, scratch)
    hits = judged = drawn = 0
    seconds = 0.0
    for images, _, spent in image_batches(
        Sampler(prior, cfg.sampling, generator), tokenizer, cfg.num_samples, conditions, cfg.batch_size
    ):
        features = space.features(images)
        moments.add(features)
        store.add(features)
        if samples is not None:
            samples.add(images)
        if judge is not None:
            wanted = classes[drawn : drawn + len(images)]
            with torch.no_grad():
                hits += int(((judge(images).argmax(1) == wanted) & (wanted >= 0)).sum())
            judged += int((wanted >= 0).sum())
        drawn += len(images)
        seconds += spent
    log.info("%d samples drawn in %.1f s", drawn, seconds)
    if samples is not None:
        samples.close()
    precision, recall = precision_recall(real.features.array(), store.array(), k=cfg.pr_k)
    out = {
        "feature_space": space.name,
        "generated_images": drawn,
        "fid": frechet_from_moments(real.moments, moments),
        "precision": precision,
        "recall": recall,
    }
    if judge is not None:
        out["class_consistency"] = hits / judged
        out["classifier_val_accuracy"] = accuracy  # how far the judge itself can be trusted
    return out, judge


def _prompt_metrics(cfg: EvaluateConfig, tokenizer: Tokenizer, prior, meta: dict, judged: tuple, paths: Paths) -> dict:
    """A text prior's prompt consistency on the captions it was trained without: for each
    held-out caption of the built-in shapes' form ("a red circle on a white background"),
    `prompt_samples` samples; the share whose shape the judge recognises as the caption's
    (`prompt_shape_consistency`), whose shape and background colours, measured against the
    palette, are the caption's (`prompt_colour_consistency`), and both (`prompt_consistency`).
    Writes eval/prompts.json (per caption) and eval/prompts.png (a row per caption). `judged`:
    the generation metrics' judge (None: trained here when the validation images are labelled)
    and the validation pass."""
    held_out = meta.get("text", {}).get("held_out_captions", [])
    for name in ("prompts.json", "prompts.png"):  # never an earlier evaluation's
        (paths.eval / name).unlink(missing_ok=True)
    if prior.conditioning != "text" or not held_out or not cfg.prompt_samples:
        return {}
    parsed = {caption: shapes.parse_caption(caption) for caption in held_out}
    skipped = [c for c, p in parsed.items() if p is None]
    if skipped:
        log.warning(
            "prompt consistency skips %d held-out caption(s) not of the built-in shapes' form: %s",
            len(skipped),
            "; ".join(map(repr, skipped)),
        )
    if len(skipped) == len(parsed):
        return {}
    judge, real = judged
    if judge is None and real.labelled > 4:
        judge, _ = _train_judge(cfg, paths.shards, real.largest_label + 1)
    names = read_shard_manifest(paths.shards).get("classes") or list(shapes.CLASSES)
    generator = torch.Generator(tokenizer.device).manual_seed(cfg.seed + 1)  # apart from the samples' draws
    sampler = Sampler(prior, cfg.sampling, generator)
    rows, grid, totals = {}, [], {"shape": 0, "colour": 0, "both": 0, "samples": 0}
    for caption, triple in parsed.items():
        if triple is None:
            continue
        label, colour, background = triple
        target = names.index(shapes.CLASSES[label]) if shapes.CLASSES[label] in names else None
        condition = caption_matrix([caption] * cfg.prompt_samples, _caption_slots(prior))
        shape_ok, colour_ok, kept = [], [], []
        for images, _, _ in image_batches(sampler, tokenizer, cfg.prompt_samples, condition, cfg.batch_size):
            if judge is not None and target is not None:
                with torch.no_grad():
                    shape_ok += (judge(images).argmax(1) == target).tolist()
            colour_ok += [shapes.measure_colours(img.numpy()) == (colour, background) for img in images]
            if len(kept) < GRID_COLUMNS:
                kept.append(images[: GRID_COLUMNS - len(kept)])
        grid.append(torch.cat(kept)[:GRID_COLUMNS])
        row = {"samples": len(colour_ok), "colour_consistency": float(np.mean(colour_ok))}
        totals["colour"] += sum(colour_ok)
        totals["samples"] += len(colour_ok)
        if shape_ok:
            both = [a and b for a, b in zip(shape_ok, colour_ok, strict=True)]
            row["shape_consistency"], row["consistency"] = float(np.mean(shape_ok)), float(np.mean(both))
            totals["shape"] += sum(shape_ok)
            totals["both"] += sum(both)
        rows[caption] = row
    paths.eval.mkdir(parents=True, exist_ok=True)
    write_json(paths.eval / "prompts.json", rows)
    make_grid(torch.cat(grid), nrow=GRID_COLUMNS, upscale=2).save(paths.eval / "prompts.png")
    n = totals["samples"]
    out = {"prompts_evaluated": len(rows), "prompt_colour_consistency": totals["colour"] / n}
    if all("shape_consistency" in row for row in rows.values()):
        out["prompt_shape_consistency"] = totals["shape"] / n
        out["prompt_consistency"] = totals["both"] / n
    log.info(
        "%d held-out prompts x %d samples: shape %s, colours %.3f",
        len(rows),
        cfg.prompt_samples,
        f"{out['prompt_shape_consistency']:.3f}" if "prompt_shape_consistency" in out else "n/a (no judge)",
        out["prompt_colour_consistency"],
    )
    return out


class _HeldOut:
    """Whether a validation image is kept from the judge's training, to test it on: from a
    hash of its key salted apart from the train/val split's (whose val keys all hash low)."""

    def __init__(self, seed: int):
        self.salt = f"judge-{seed}"

    def __call__(self, key: str) -> bool:
        return assign_split(key, JUDGE_HELD_OUT, self.salt) == "val"


def _train_judge(cfg: EvaluateConfig, shards: Path, num_classes: int):
    """The class-consistency judge, trained from a shuffled stream of the labelled validation
    images outside the held-out fifth; its accuracy on that fifth, streamed."""
    held_out = _HeldOut(cfg.seed)
    stream = TrainingStream(
        shard_paths(shards, "val"),
        StreamLayout(JUDGE_BATCH),
        shuffle_buffer=JUDGE_BUFFER,
        seed=cfg.seed,
        keep=lambda key: not held_out(key),
    )
    judge = fit_classifier(
        ((to_float(x), y) for x, y in stream.batches()), num_classes, steps=cfg.classifier_steps, seed=cfg.seed
    )

    def tested() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for raw, labels, keys in split_batches(shards, "val", cfg.batch_size):
            mask = torch.tensor([held_out(k) for k in keys])
            yield to_float(raw[mask]), labels[mask]

    return judge, classifier_accuracy(judge, tested())


def _write_usage_csv(path: Path, counts: CodeCounts, codebook_size: int) -> None:
    """code,count over all token columns: every code up to 65,536 codes, the used ones past
    that (a plot of 2^18 mostly empty rows says less than the list of used codes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    codes, used = counts.all_columns()
    if codebook_size <= 65536:
        dense = np.zeros(codebook_size, dtype=np.int64)
        dense[codes] = used
        codes, used = np.arange(codebook_size), dense
    with open(path, "w") as f:
        f.write("code,count\n")
        f.writelines(f"{c},{n}\n" for c, n in zip(codes.tolist(), used.tolist(), strict=True))


def main() -> None:
    stage_main(None, evaluate_and_promote)


def evaluate_and_promote(params: Params, paths: Paths = Paths()) -> EvaluateResult:
    """The stage as DVC runs it: evaluate, then the registered versions of the project's
    tokenizer and prior against their champions (pipelines/registry.py; `evaluate.promote`)."""
    result = run(params.evaluate, paths)
    for kind, (alias, reason) in promote_models(params, paths, result.metrics).items():
        log.info("%s: @%s (%s)", kind, alias, reason)
    return result


if __name__ == "__main__":
    main()
