"""AR against MaskGIT (or any train_prior settings against each other) at the project's budget,
on a finished run's shards, tokenizer and tokens (`make run` first). Prints a table (not a
timed test).

    .venv/bin/python benchmarks/prior_kinds.py                         # ar and maskgit, params.yaml's budget
    .venv/bin/python benchmarks/prior_kinds.py --rows "kind=ar" "kind=ar,n_layer=8,n_embd=96"
    .venv/bin/python benchmarks/prior_kinds.py --sampling guidance_scale=2 temperature=0.9
    .venv/bin/python benchmarks/prior_kinds.py --profile profiles/text-to-image.yaml --rows "steps=3000"

Each row trains a prior with params.yaml's `train_prior` and that row's overrides (KEY=VALUE,
comma-separated; YAML values) in a scratch project that links the run's shards, tokenizer and
tokens, then runs the real `evaluate` stage on it (with `--sampling` over `sample.sampling`,
what `vqpipe sample` draws with): class consistency, FID, precision, recall, as `make run`
reports them; training steps/s; sampling images/s for 64 images (their tokens and decoding,
one batch); and the validation bits per token given the true class and given none (a MaskGIT
prior's: per hidden token). MLflow runs go to the scratch project's own store.

With `--profile` (params.yaml with a profile's values over it) a text prior's rows also give
the training seconds and prompt consistency on its held-out captions (shape, colours, both);
its bits are given the row's caption and given the empty caption, its class consistency is for
the validation rows' captions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
import yaml

from components.config import SamplingOptions, merge_profile, parse_params, read_profile, read_yaml
from components.data import tokens as token_io
from components.data.captions import caption_matrix
from components.metrics.prior import PriorBits
from components.priors import Sampler, load_prior, sample_images
from components.tokenizers import Tokenizer
from pipelines import evaluate, train_prior
from pipelines.runtime import Paths


def _overrides(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _bits(prior, val_parts: list[Path], given: bool) -> float:
    """Validation bits per token given each row's class (a text prior: its caption), or given none."""
    bits = PriorBits(prior)
    text = prior.conditioning == "text"
    for batch in token_io.iter_token_batches(val_parts, 256, captions=text):
        if text:
            condition = caption_matrix(
                batch.captions if given else [None] * len(batch.keys), prior.null_condition(1).shape[-1]
            )
        else:
            labels = torch.from_numpy(batch.labels)
            condition = labels if given else torch.full_like(labels, -1)
        bits.add(torch.from_numpy(batch.tokens), condition)
    return bits.bits


def _row(raw: dict, overrides: dict, sampling: dict, run: Path) -> dict:
    project = Paths(run)
    for name in ("shards", "tokenizer", "tokens"):
        target = getattr(project, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(getattr(Paths(ROOT), name).resolve(), target_is_directory=True)
    raw = json.loads(json.dumps(raw))
    raw["train_prior"].update(overrides, registered_model=None, checkpoint_dir=str(run / "ckpt"), resume=False)
    raw["evaluate"]["sampling"] = {**raw["sample"]["sampling"], **sampling}
    params = parse_params(raw, root=ROOT)
    trained = train_prior.run(params.train_prior, project)
    metrics = evaluate.run(params.evaluate, project).metrics

    tokenizer = Tokenizer.load(project.tokenizer)
    prior, _ = load_prior(project.prior, tokenizer=tokenizer)
    val_parts = token_io.split_parts(project.tokens, "val")
    labels = torch.arange(64) % prior.num_classes if prior.num_classes else None
    if prior.conditioning == "text":
        labels = caption_matrix(["a red circle on a white background"] * 64, prior.null_condition(1).shape[-1])
    options = SamplingOptions.model_validate(raw["evaluate"]["sampling"])
    sample_images(Sampler(prior, options, torch.Generator().manual_seed(1)), tokenizer, 8, labels[:8], 8)  # warm-up
    started = time.perf_counter()
    sample_images(Sampler(prior, options, torch.Generator().manual_seed(0)), tokenizer, 64, labels, 64)
    seconds = time.perf_counter() - started
    nan = float("nan")
    return {
        "steps": params.train_prior.steps,
        "steps_per_second": trained.metrics["steps_per_second"],
        "train_seconds": params.train_prior.steps / trained.metrics["steps_per_second"],
        "prompt_shape": metrics.get("prompt_shape_consistency", nan),
        "prompt_colour": metrics.get("prompt_colour_consistency", nan),
        "prompt_both": metrics.get("prompt_consistency", nan),
        "bits_given_class": _bits(prior, val_parts, True) if prior.conditioning != "none" else nan,
        "bits_given_none": _bits(prior, val_parts, False),
        "train_bits": trained.metrics["train_bits_per_token"],
        "class_consistency": metrics.get("class_consistency", float("nan")),
        "fid": metrics.get("fid", float("nan")),
        "precision": metrics.get("precision", float("nan")),
        "recall": metrics.get("recall", float("nan")),
        "images_per_second": 64 / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=["kind=ar", "kind=maskgit"])
    parser.add_argument("--sampling", nargs="*", default=[], help="KEY=VALUE over sample.sampling")
    parser.add_argument("--keep", default=None, help="keep the scratch projects in this folder")
    parser.add_argument("--profile", default=None, help="a params profile over params.yaml (e.g. a text prior's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    raw = read_yaml(ROOT / "params.yaml")
    if args.profile:
        raw = merge_profile(raw, read_profile(args.profile))
    sampling = _overrides(",".join(args.sampling))
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vqpipe-prior-kinds-"))
    base.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{base.resolve()}/mlflow.db"
    print(f"sampling: {json.dumps({**raw['sample']['sampling'], **sampling})}; scratch: {base}\n")
    given = "caption" if raw["train_prior"].get("condition") == "text" else "class"
    print(
        f"| train_prior | steps | train steps/s (s) | val bits/token: {given} / none (train) | class consistency "
        "| prompt consistency: shape / colours / both | FID | precision | recall | sampling images/s (64) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, text in enumerate(args.rows):
        r = _row(raw, _overrides(text), sampling, base / f"row{i}")
        print(
            f"| {text} | {r['steps']} | {r['steps_per_second']:.2f} ({r['train_seconds']:.0f}) "
            f"| {r['bits_given_class']:.3f} / {r['bits_given_none']:.3f} ({r['train_bits']:.3f}) "
            f"| {r['class_consistency']:.3f} | {r['prompt_shape']:.3f} / {r['prompt_colour']:.3f} / "
            f"{r['prompt_both']:.3f} | {r['fid']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} "
            f"| {r['images_per_second']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
