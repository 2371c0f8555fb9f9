"""Does memory stay flat when the data grows tenfold? Prints tables (not a timed test).

    .venv/bin/python benchmarks/scale.py [--stages train_prior evaluate tokenize webdataset]
        [--code . /path/to/an/older/checkout] [--prior-rows 200000] [--val-images 2000] [--shard-images 1000]

For `train_prior`, `evaluate` and tokenizing one shard (`tokenize_shard`, what each tokenize
actor does), at x1 and x10 data: the peak resident memory above the process's memory after its
imports (peak RSS is reset once the imports are done: /proc/self/clear_refs), and the time.
Each run is a fresh process; `--code` runs the same stage from other checkouts (before/after
in one run, on the same data), as long as they read the same formats.

- train_prior: `--prior-rows` train token rows (8x8 grids, 256 codes, 10 classes; 5,000 val
  rows at either size), a one-layer prior, 30 steps of 64 and a validation at the end.
- evaluate: `--val-images` validation images of 64 px (the built-in shapes), their tokens, a
  random tokenizer and prior, 256 samples, a judge of 50 steps.
- tokenize: one WebDataset shard of `--shard-images` 64-px PNGs, each with a 300-character
  caption, tokenized in batches of 256.
- webdataset: a `webdataset:` source of 8 tars of 2,000 320x256 JPEGs into shards at 256 px
  (PNG and JPG shards, in process and on Ray, the stage's start-up included) against a plain
  read of the same tars, and a read that decodes and resizes without writing.

Goal: memory at x10 within 1.2x of x1; time close to linear in the data.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from components.config import TrainTokenizerConfig, parse_params
from components.data import tokens as token_io
from components.data.corpus import read_shard
from components.data.images import decode_image
from components.data.shapes import render
from components.priors import build_prior, save_prior
from components.tokenizers import Tokenizer
from components.tokenizers.tokenizer import build_model, export_config, save_export
from pipelines import shard, tokenize
from pipelines.runtime import Paths

CHILD = r"""
import importlib, json, os, sys, time
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["code"])
import numpy, pyarrow, torch, mlflow, sqlalchemy
mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"]); mlflow.set_experiment("scale")
from pipelines.runtime import Paths
import components.config as config

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

stage = spec["stage"]
if stage == "tokenize":
    from components.data.tokenization import ShardTask, tokenize_shard
    from components.tokenizers import Tokenizer
    tokenizer = Tokenizer.load(spec["tokenizer"])
else:
    module = importlib.import_module("pipelines." + stage)
    model = getattr(config, spec["config"])
    cfg = model(**{k: v for k, v in spec["settings"].items() if k in model.model_fields})
open("/proc/self/clear_refs", "w").write("5")  # the peak from here on
base = status("VmRSS")
began = time.perf_counter()
if stage == "tokenize":
    tokenize_shard(tokenizer, ShardTask(spec["shard"], spec["out"], "part.parquet"), 256, 2)
else:
    module.run(cfg, Paths(spec["project"]))
print("RESULT " + json.dumps({"seconds": time.perf_counter() - began, "peak_mb": status("VmHWM") - base}))
"""


def child(code: str, spec: dict, env: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps({"code": str(Path(code).resolve()), **spec})],
        capture_output=True,
        text=True,
        env={**os.environ, **env, "PYTHONPATH": str(Path(code).resolve())},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{spec['stage']} failed with {code}:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def make_tokenizer(path: Path) -> Tokenizer:
    """A 64-px tokenizer with random weights, 8x8 grid, 256 codes: the compute of a trained one."""
    cfg = TrainTokenizerConfig(channels=16, latent_dim=16, downsample=8, quantizer={"type": "vq", "codebook_size": 256})
    config = export_config(cfg, 64)
    save_export(path, config, build_model(config))
    return Tokenizer.load(path)


def prior_project(root: Path, rows: int) -> Path:
    tokenizer = make_tokenizer(root / "models" / "tokenizer")
    rng = np.random.default_rng(0)
    layout = token_io.PartLayout(tokenizer.fingerprint, 256, (8, 8))
    parts, per_part = [], 100_000
    for split, total in (("train", rows), ("val", 5000)):
        for n, start in enumerate(range(0, total, per_part)):
            count = min(per_part, total - start)
            tokens = rng.integers(0, 256, (count, 64))
            table = token_io.token_table(
                token_io.PartRows([f"{split}{start + i}" for i in range(count)], {"tokens": tokens}, tokens[:, 0] % 10),
                layout,
            )
            name = f"part-{split}-{n:06d}.parquet"
            (root / "data" / "tokens").mkdir(parents=True, exist_ok=True)
            pq.write_table(table, root / "data" / "tokens" / name, compression="zstd", row_group_size=1024)
            parts.append({"part": name, "split": split, "rows": count})
    token_io.write_manifest(root / "data" / "tokens", {"parts": parts, "classes": None})
    return root


def evaluate_project(root: Path, images: int, env: dict) -> Path:
    os.environ.update(env)
    paths = Paths(root)
    raw = {"shard": {"num_images": round(images / 0.9), "image_size": 64, "val_fraction": 0.9, "ray_min_inputs": 1}}
    params = parse_params(raw | {"tokenize": {"actors": 2}})
    shard.run(params.shard, paths)
    tokenizer = make_tokenizer(paths.tokenizer)
    tokenize.run(params.tokenize, paths)
    prior = build_prior(tokenizer, num_classes=4, n_layer=1, n_head=2, n_embd=32)
    save_prior(
        paths.prior,
        prior,
        tokenizer_fingerprint=tokenizer.fingerprint,
        grid=tokenizer.column_grids,
        class_names=["circle", "square", "triangle", "cross"],
    )
    return root


def shard_file(path: Path, images: int) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for i in range(images):
            img, label = render(i)
            buf = io.BytesIO()
            img.resize((64, 64), Image.Resampling.BICUBIC).save(buf, format="PNG")
            caption = (f"a picture of shape {label} number {i} " * 10)[:300]
            sink.write({"__key__": f"{i:08d}", "png": buf.getvalue(), "cls": str(label), "txt": caption})
    return path


def memory_table(args, work: Path, env: dict) -> None:
    print("\n| stage | data | code | peak memory above imports | time |")
    print("|---|---|---|---|---|")
    sizes = {
        "train_prior": (args.prior_rows, "token rows"),
        "evaluate": (args.val_images, "val images"),
        "tokenize": (args.shard_images, "images in the shard"),
    }
    for stage in [s for s in args.stages if s in sizes]:
        base, unit = sizes[stage]
        for scale in (1, 10):
            n = base * scale
            root = work / f"{stage}-{n}"
            if stage == "train_prior":
                project = prior_project(root, n)
                settings = {"n_layer": 1, "n_head": 2, "n_embd": 32, "steps": 30, "batch_size": 64, "warmup_steps": 5}
                settings |= {"val_every": 1000, "checkpoint_every": 1000, "registered_model": None, "resume": False}
                spec = {"stage": stage, "config": "TrainPriorConfig", "project": str(project), "settings": settings}
            elif stage == "evaluate":
                project = evaluate_project(root, n, env)
                settings = {"batch_size": 256, "num_samples": 256, "classifier_steps": 50}
                spec = {"stage": stage, "config": "EvaluateConfig", "project": str(project), "settings": settings}
            else:
                root.mkdir(parents=True)
                make_tokenizer(root / "tokenizer")
                spec = {"stage": stage, "tokenizer": str(root / "tokenizer"), "out": str(root / "out")}
                spec["shard"] = str(shard_file(root / "shard.tar", n))
            for code in args.code:
                if stage == "train_prior":
                    spec["settings"]["checkpoint_dir"] = str(root / f"ckpt-{abs(hash(code))}")
                result = child(code, spec, env)
                print(
                    f"| {stage} | {n:,} {unit} | {code} | {result['peak_mb']:,.0f} MiB | {result['seconds']:.1f} s |",
                    flush=True,
                )


def webdataset_table(work: Path, env: dict) -> None:
    corpus = work / "wds-corpus"
    corpus.mkdir(parents=True)
    rng = np.random.default_rng(0)
    count = 0
    for s in range(8):
        with wds.TarWriter(str(corpus / f"{s:05d}.tar")) as sink:
            for i in range(250):
                img, label = render(count)
                noisy = np.asarray(img.resize((320, 256)), dtype=np.int16) + rng.integers(-12, 12, (256, 320, 3))
                buf = io.BytesIO()
                Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
                sink.write({"__key__": f"{s:05d}{i:05d}", "jpg": buf.getvalue(), "cls": str(label), "txt": "a shape"})
                count += 1
    began = time.perf_counter()
    total = sum(len(sample["jpg"]) for url in sorted(corpus.glob("*.tar")) for sample in read_shard(str(url)))
    plain = count / (time.perf_counter() - began)
    print(f"\n{count} images of 320x256 JPEG ({total / count / 1024:.0f} KiB each) in 8 tars")
    print("\n| how | images/s | vs plain read |")
    print("|---|---|---|")
    print(f"| plain read of the tars (`read_shard`) | {plain:,.0f} | 1.00 |")
    began = time.perf_counter()
    for url in sorted(corpus.glob("*.tar")):
        for sample in read_shard(str(url)):
            decode_image(sample["jpg"], 256)
    decoded = count / (time.perf_counter() - began)
    print(f"| read + decode + resize to 256 px, nothing written | {decoded:,.0f} | {decoded / plain:.2f} |")
    os.environ.update(env)
    for fmt in ("png", "jpg"):
        for where, ray_min in (("in process", 10**9), ("Ray, 2 tasks", 1)):
            raw = {"source": f"webdataset:{corpus}/*.tar", "image_size": 256, "image_format": fmt}
            params = parse_params({"shard": raw | {"ray_min_inputs": ray_min, "samples_per_shard": 500}})
            began = time.perf_counter()
            manifest = shard.run(params.shard, Paths(work / f"wds-{fmt}-{ray_min}")).manifest
            rate = count / (time.perf_counter() - began)
            assert manifest["samples"]["train"] + manifest["samples"]["val"] == count
            print(
                f"| `webdataset:` -> {fmt} shards at 256 px, {where} | {rate:,.0f} | {rate / plain:.2f} |", flush=True
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=["train_prior", "evaluate", "tokenize", "webdataset"])
    parser.add_argument("--code", nargs="+", default=["."], help="checkouts to run the stages from")
    parser.add_argument("--prior-rows", type=int, default=200_000)
    parser.add_argument("--val-images", type=int, default=2000)
    parser.add_argument("--shard-images", type=int, default=1000)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vqpipe-scale-", dir=args.workdir) as tmp:
        work = Path(tmp)
        env = {"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        memory_table(args, work, env)
        if "webdataset" in args.stages:
            webdataset_table(work, env)


if __name__ == "__main__":
    main()
