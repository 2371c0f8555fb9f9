"""Is tokenizing a corpus compute-bound? Prints a table (not a timed test).

    .venv/bin/python benchmarks/tokenize_corpus.py [--shards 16] [--per-shard 256] [--size 64] [--repeats 3]
    .venv/bin/python benchmarks/tokenize_corpus.py --image-size 256 --gpus-per-actor 1 --actors 1   # on a GPU

A corpus of `shards` WebDataset shards of `per_shard` PNG images of `size`x`size` (the built-in
shapes, upscaled), tokenized by a tokenizer of the default architecture at `image_size`
(random weights: the same compute as a trained one). For 1 and 2 Ray actors:

- whole job: `tokenize_corpus` as `vqpipe tokenize` runs it (read the tars, decode, resize,
  encode, write Parquet, manifest), images/s over its tokenizing time;
- bare forward: the same actors (same threads) encoding the same images, decoded and
  resized beforehand and held in memory, in the same batches: images/s of the model alone.

Goal: whole job >= 0.85 of bare forward (decoding, resizing and writing hidden behind compute).
Medians over `repeats`. The command's fixed start-up (Prefect, Ray, loading) is printed apart.
"""

from __future__ import annotations

import argparse
import io
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from components.config import TrainTokenizerConfig
from components.data.corpus import read_shard
from components.data.images import decode_image, to_array
from components.data.shapes import render
from components.tokenizers.tokenizer import CONFIG_FILE, WEIGHTS_FILE, Tokenizer, build_model, export_config
from pipelines.corpus import CorpusJob, load_tokenizer_files, tokenize_corpus
from pipelines.distributed import init_ray
from pipelines.runtime import resolve_device


def make_corpus(root: Path, shards: int, per_shard: int, size: int) -> list[str]:
    root.mkdir(parents=True)
    urls = []
    n = 0
    for s in range(shards):
        url = str(root / f"bench-{s:05d}.tar")
        with wds.TarWriter(url) as sink:
            for i in range(per_shard):
                img, label = render(n)
                n += 1
                buf = io.BytesIO()
                img.resize((size, size), Image.Resampling.BICUBIC).save(buf, format="PNG")
                sink.write(
                    {"__key__": f"{s:05d}{i:05d}", "png": buf.getvalue(), "cls": str(label), "txt": f"shape {label}"}
                )
        urls.append(url)
    return urls


class ForwardActor:
    """A Ray actor with the same tokenizer and threads as a tokenizing actor, timing the forward."""

    def __init__(self, files, device, threads):
        torch.set_num_threads(threads)
        self.tokenizer = load_tokenizer_files(files, resolve_device(device))

    def forward(self, batches) -> int:
        n = 0
        for batch in batches:
            x = torch.from_numpy(batch).float().div_(255.0)
            with torch.inference_mode():
                for column in self.tokenizer.encode_columns(x).values():
                    column.cpu()
            n += len(batch)
        return n


def bare_forward(ray, files, batches, count: int, args) -> float:
    actor = ray.remote(ForwardActor).options(num_cpus=args.cpus_per_actor, num_gpus=args.gpus_per_actor)
    device = "cuda" if args.gpus_per_actor > 0 else "cpu"
    actors = [actor.remote(files, device, max(1, int(args.cpus_per_actor))) for _ in range(count)]
    shares = [ray.put(batches[i::count]) for i in range(count)]
    ray.get([a.forward.remote(batches[:1]) for a in actors])  # warm-up, not timed
    start = time.perf_counter()
    images = sum(ray.get([a.forward.remote(share) for a, share in zip(actors, shares, strict=True)]))
    seconds = time.perf_counter() - start
    for a in actors:
        ray.kill(a)
    return images / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--size", type=int, default=64, help="stored image side (resized to --image-size)")
    parser.add_argument("--image-size", type=int, default=32, help="the tokenizer's resolution")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vqpipe-bench-tokenize-"))
    cfg = TrainTokenizerConfig()
    Tokenizer(build_model(export_config(cfg, args.image_size)).eval(), export_config(cfg, args.image_size)).save(
        work / "tokenizer"
    )
    urls = make_corpus(work / "corpus", args.shards, args.per_shard, args.size)
    total = args.shards * args.per_shard
    ray = init_ray()
    print(
        f"{total} images ({args.shards} shards of {args.per_shard}, {args.size}px PNG -> {args.image_size}px), "
        f"batch {args.batch_size}, {args.cpus_per_actor:g} CPU / {args.gpus_per_actor:g} GPU per actor\n"
    )
    print(f"{'actors':>7}  {'whole job img/s':>15}  {'bare forward img/s':>18}  {'ratio':>5}  {'job wall s':>10}")
    for count in args.actors:
        job_rate, bare_rate, wall = _measure(ray, work, urls, count, args)
        print(f"{count:>7}  {job_rate:>15.0f}  {bare_rate:>18.0f}  {job_rate / bare_rate:>5.2f}  {wall:>10.2f}")
    print(
        "\nwhole job: from the actors ready (tokenizer loaded) to the last part written;"
        "\njob wall: tokenize_corpus end to end (planning, actor start-up, the manifest). "
        "`vqpipe tokenize` adds Prefect's start."
    )
    shutil.rmtree(work)


def _measure(ray, work: Path, urls: list[str], count: int, args) -> tuple[float, float, float]:
    """Medians over the repeats: the whole job's images/s, the bare forward's, the job's wall seconds."""
    files = {name: (work / "tokenizer" / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
    # The same images, decoded and resized beforehand, in the batches the job makes (per shard).
    batches = []
    for url in urls:
        arrays = [to_array(decode_image(s["png"], args.image_size)) for s in read_shard(url)]
        batches += [np.stack(arrays[i : i + args.batch_size]) for i in range(0, len(arrays), args.batch_size)]
    job_rates, bare_rates, walls = [], [], []
    for _ in range(args.repeats):
        out = work / "tokens"
        shutil.rmtree(out, ignore_errors=True)
        job = CorpusJob(
            inputs=urls,
            output=str(out),
            tokenizer=str(work / "tokenizer"),
            batch_size=args.batch_size,
            actors=count,
            cpus_per_actor=args.cpus_per_actor,
            gpus_per_actor=args.gpus_per_actor,
        )
        start = time.perf_counter()
        result = tokenize_corpus(job)
        walls.append(time.perf_counter() - start)
        assert result.manifest["rows"] == args.shards * args.per_shard, result.manifest["rows"]
        job_rates.append(result.images_per_second)
        bare_rates.append(bare_forward(ray, files, batches, count, args))
    return statistics.median(job_rates), statistics.median(bare_rates), statistics.median(walls)


if __name__ == "__main__":
    main()
