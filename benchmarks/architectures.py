"""Tokenizer architectures side by side: VQ-VAE, VQ-VAE-2 and VQ-GAN trained with the default
settings on the built-in shapes data. Prints a table (not a timed test).

    .venv/bin/python benchmarks/architectures.py [--steps 600] [--images 16000]
    .venv/bin/python benchmarks/architectures.py --llamagen [--device cuda] [--batch 8]

Per architecture: tokens per image, validation PSNR and SSIM (all validation images, through the
exported tokenizer), codebook usage (mean over tiers), the stage's steps/s. VQ-GAN runs without
LPIPS (no weights file here) and its discriminator starts halfway.

`--llamagen`: the GPU profile's tokenizer (profiles/gpu-256.yaml: LlamaGen's VQ-16 at 256 px, a
VQ-GAN with LPIPS, random LPIPS weights) on this machine: parameters, training images/s (the
whole step: generator, LPIPS, adversarial term, discriminator) and encoding images/s, in fp32
and bf16 autocast, with peak GPU memory on CUDA. Medians over --repeats timed steps. Then the
counted FLOPs of one image (the figures behind docs/scaling-out.md's cost estimate).
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import shapes_project, sibling, timed
from components.config import merge_profile, overlay, parse_params, read_profile, read_yaml
from components.data.shards import load_split, to_float
from components.metrics import psnr, ssim
from components.tokenizers import Tokenizer
from components.tokenizers.lpips import LPIPS
from components.tokenizers.training import build_step
from pipelines import train_tokenizer

ARCHS = {
    "vqvae": {},
    "vqvae2 (top 4x4 + bottom 8x8)": {"arch": "vqvae2"},
    "vqgan (l1 + hinge GAN)": {"arch": "vqgan", "recon_loss": "l1"},
    "vqgan (l2 + hinge GAN, LeCAM 0.001)": {"arch": "vqgan", "vqgan": {"lecam_weight": 0.001}},
}


def _median_time(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `repeats` runs, after one untimed warm-up."""
    fn()
    return statistics.median(timed(fn, device) for _ in range(repeats))


def llamagen(device: torch.device, batch: int, encode_batch: int, repeats: int) -> None:
    """The GPU profile's tokenizer at 256 px: training and encoding throughput on `device`."""
    lpips_file = Path(tempfile.mkdtemp(prefix="vqpipe-bench-")) / "lpips.safetensors"
    save_file({k: v.abs().contiguous() for k, v in LPIPS().state_dict().items()}, str(lpips_file))
    cfg = _profile_params(lpips_file).train_tokenizer.model_copy(update={"batch_size": batch})
    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8)
    print(f"\n## LlamaGen VQ-16 (profiles/gpu-256.yaml) at 256 px on {device}\n")
    print("| precision | parameters (generator + discriminator) | train images/s | encode images/s | peak GPU memory |")
    print("|---|---|---|---|---|")
    for precision in ("fp32", "bf16"):
        print(_llamagen_row(cfg, lpips_file, precision, images, device, encode_batch, repeats), flush=True)
    print(_flops_per_image(cfg, lpips_file), flush=True)


def _flops_per_image(cfg, lpips_file: Path) -> str:
    """Counted FLOPs of one 256-px image (torch.utils.flop_counter, fp32 on the CPU): the
    generator's forward and backward, LPIPS's, the discriminator's on a real and a fake, encoding."""
    step = build_step(cfg, 256, torch.device("cpu"), None, perceptual_weights=str(lpips_file))
    x = torch.rand(1, 3, 256, 256) * 2 - 1

    def counted(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e12

    generator = counted(lambda: step.model(x).reconstruction.sum().backward())
    lpips = counted(lambda: step.lpips(x.clone().requires_grad_(), x).sum().backward())
    disc = counted(lambda: step.disc(torch.cat([x, x])).sum().backward())
    step.model.eval()
    with torch.no_grad():
        encode = counted(lambda: step.model.encode_indices(x))
    return (
        f"\nTFLOP per image: generator forward + backward {generator:.2f}, LPIPS {lpips:.2f}, "
        f"discriminator {disc:.2f}; encoding {encode:.2f}"
    )


def _llamagen_row(cfg, lpips_file: Path, precision: str, images, device, encode_batch: int, repeats: int) -> str:
    amp = torch.bfloat16 if precision == "bf16" else None
    torch.manual_seed(0)
    step = build_step(cfg, 256, device, amp, perceptual_weights=str(lpips_file))
    counter = iter(range(cfg.vqgan.disc_start + 1, 10**9))  # the adversarial part on from the start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train = _median_time(lambda: step.step(images, next(counter)), repeats, device)
    tokenizer = Tokenizer(step.model, {"image_size": 256}, device)
    x = torch.rand(encode_batch, 3, 256, 256, device=device)

    def encode():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp is not None):
            tokenizer.encode(x)

    enc = _median_time(encode, repeats, device)
    peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else "-"
    generator = sum(p.numel() for p in step.model.parameters())
    disc = sum(p.numel() for p in step.disc.parameters())
    return (
        f"| {precision} | {generator / 1e6:.1f}M + {disc / 1e6:.1f}M | {len(images) / train:.2f} | "
        f"{encode_batch / enc:.1f} | {peak} |"
    )


def _profile_params(lpips_file: Path):
    """params.yaml with the GPU profile over it, its LPIPS file replaced by `lpips_file`."""
    profile = read_profile(ROOT / "profiles" / "gpu-256.yaml")
    overlay(profile, {"train_tokenizer": {"perceptual_weights": str(lpips_file)}})
    return parse_params(merge_profile(read_yaml(ROOT / "params.yaml"), profile))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--images", type=int, default=16000)
    parser.add_argument("--llamagen", action="store_true", help="the GPU profile's tokenizer at 256 px instead")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4, help="--llamagen: training images per step")
    parser.add_argument("--encode-batch", type=int, default=16, help="--llamagen: images per encode")
    parser.add_argument("--repeats", type=int, default=3, help="--llamagen: timed repetitions")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    if args.llamagen:
        llamagen(torch.device(args.device), args.batch, args.encode_batch, args.repeats)
        return

    base = shapes_project(args.images, "vqpipe-bench-archs-")
    val = to_float(load_split(base.shards, "val")[0])

    print(
        f"\n## Architectures: default settings, {args.steps} steps, built-in shapes ({len(val):,} validation images)\n"
    )
    print("| arch | tokens/image | parameters | val PSNR | val SSIM | codebook usage | steps/s |")
    print("|---|---|---|---|---|---|---|")
    for name, options in ARCHS.items():
        paths = sibling(base, re.sub(r"[^a-z0-9]+", "_", name))
        disc = {"disc_start": args.steps // 2, **options.get("vqgan", {})}
        raw = {
            "train_tokenizer": {
                **options,
                "vqgan": disc,
                "steps": args.steps,
                "val_every": args.steps,
                "checkpoint_dir": str(paths.root / "checkpoints"),
            }
        }
        cfg = parse_params(raw).train_tokenizer
        result = train_tokenizer.run(cfg, paths)
        tok = Tokenizer.load(paths.tokenizer)
        with torch.no_grad():
            recon = torch.cat([tok.reconstruct(val[i : i + 256]) for i in range(0, len(val), 256)])
        params = sum(p.numel() for p in tok.model.parameters())
        print(
            f"| {name} | {tok.num_tokens} | {params / 1e3:.0f}k | {psnr(recon, val).mean().item():.2f} dB | "
            f"{ssim(recon, val).mean().item():.3f} | {result.metrics['train_codebook_usage']:.1f}% | "
            f"{result.metrics['steps_per_second']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
