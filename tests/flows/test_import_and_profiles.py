"""`vqpipe import-tokenizer` into an export the corpus tokenizer and the prior use like any
other; `vqpipe validate --profile` and `apply-profile` with the GPU profile; the GPU profile's
network and recipe trained for two steps at reduced size on the CPU."""

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import torch

from components.config import load_params, parse_params
from components.data import shapes
from components.priors import build_prior
from components.tokenizers import Tokenizer
from components.tokenizers import published as pub
from components.tokenizers.training import build_step
from flows.cli import main
from pipelines.corpus import CorpusJob, tokenize_corpus
from tests.components.test_architectures import _lpips_file
from tests.components.test_published import TINY, _reference
from tests.corpus import make_corpus

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "profiles" / "gpu-256.yaml"


def test_an_imported_tokenizer_tokenizes_a_corpus_and_sizes_a_prior(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(pub.MODELS["llamagen"], "tiny", TINY["llamagen"])
    reference = _reference("llamagen")
    torch.save({"model": reference.state_dict()}, tmp_path / "vq.pt")
    out = tmp_path / "export"
    args = ["import-tokenizer", "--format", "llamagen", str(tmp_path / "vq.pt"), "--model", "tiny"]
    assert main([*args, "--output", str(out), "--image-size", "32"]) == 0
    printed = capsys.readouterr().out
    assert "llamagen tiny" in printed and "8x8 tokens" in printed and str(out) in printed
    assert main([*args, "--output", str(out)]) == 2  # an export is there: not replaced silently
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--format", "taming", "--output", str(tmp_path / "x")]) == 2
    assert "use --format llamagen" in capsys.readouterr().err

    tok = Tokenizer.load(out)
    truths = make_corpus(tmp_path / "shards", shards=2)
    job = CorpusJob(inputs=[str(t.path) for t in truths], output=str(tmp_path / "tokens"), tokenizer=str(out))
    job.in_process, job.retry_delay = True, 0
    result = tokenize_corpus(job)
    parts = sorted((tmp_path / "tokens").glob("part-*.parquet"))
    table = pq.read_table(parts[0])
    assert result.manifest["rows"] > 0 and table.schema.metadata[b"vqpipe.tokenizer_fingerprint"].decode() == (
        tok.fingerprint
    )
    first = torch.tensor(table.column("tokens")[0].as_py()).reshape(1, 8, 8)
    assert first.max() < 64 and tok.decode(first).shape == (1, 3, 32, 32)
    prior = build_prior(tok, num_classes=0, n_layer=1, n_head=2, n_embd=16)
    assert prior(tok.flatten(first)).shape[-1] >= 64


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "profiles").mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    shutil.copy(PROFILE, repo / "profiles" / "gpu-256.yaml")
    (repo / "weights").mkdir()
    _lpips_file(repo / "weights" / "lpips_vgg16.safetensors", "lpips")
    return repo


def test_the_gpu_profile_validates_and_applies_into_params_yaml(tmp_path, monkeypatch, capsys):
    repo = _repo(tmp_path)
    monkeypatch.chdir(repo)  # the profile names its LPIPS file relative to the project
    assert main(["--repo", str(repo), "validate", "--profile", "profiles/gpu-256.yaml"]) == 0
    merged = load_params("params.yaml", "profiles/gpu-256.yaml")
    tok = merged.train_tokenizer
    assert (tok.network, tok.downsample, tok.latent_dim, tok.quantizer.codebook_size) == ("taming", 16, 8, 16384)
    assert tok.quantizer.cosine and tok.precision == "bf16" and tok.loader_workers == 8
    assert merged.train_prior.lr == 3e-4  # a value not in the profile keeps params.yaml's

    bad = repo / "bad.yaml"
    bad.write_text("train_tokenizer:\n  network: taming\n  taming:\n    ch_mult: [1, 2]\n")
    before = (repo / "params.yaml").read_bytes()
    assert main(["--repo", str(repo), "apply-profile", str(bad)]) == 2
    assert "train_tokenizer.taming.ch_mult" in capsys.readouterr().err
    assert (repo / "params.yaml").read_bytes() == before  # nothing written

    assert main(["--repo", str(repo), "apply-profile", "profiles/gpu-256.yaml"]) == 0
    assert "train_tokenizer.network: 'compact' -> 'taming'" in capsys.readouterr().out
    text = (repo / "params.yaml").read_text()
    assert text.startswith("# Every knob of the pipeline")  # comments kept
    untouched = [line for line in before.decode().splitlines() if "label_column: null" in line]
    assert untouched and untouched[0] in text.splitlines()  # a null the profile does not set stays `null`
    assert load_params("params.yaml") == merged
    assert main(["--repo", str(repo), "apply-profile", "profiles/gpu-256.yaml"]) == 0
    assert "0 value(s)" in capsys.readouterr().out


def test_the_gpu_profile_trains_two_steps_at_reduced_size_on_cpu(tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    monkeypatch.chdir(repo)
    raw = load_params("params.yaml", "profiles/gpu-256.yaml").model_dump(mode="json")
    # The profile's network, quantizer, losses and recipe; narrower, at 32 px, the GAN on from the start.
    raw["shard"]["image_size"] = 32
    tok = raw["train_tokenizer"]
    tok.update(channels=32, batch_size=4, lanes=4, grad_accum_steps=2, steps=2)
    tok["taming"].update(z_channels=32, attn_resolutions=[2])
    tok["quantizer"]["codebook_size"] = 256
    tok["vqgan"].update(disc_start=0, disc_channels=8, disc_layers=2)
    cfg = parse_params(raw).train_tokenizer
    torch.manual_seed(0)
    step = build_step(cfg, 32, torch.device("cpu"), amp_dtype=torch.bfloat16, perceptual_weights=cfg.perceptual_weights)
    before = {k: v.clone() for k, v in step.model.state_dict().items()}
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    for n in (1, 2):
        parts = step.step(images, n)
        assert all(torch.isfinite(v).all() for v in parts.values())
    assert {"perceptual_loss", "g_loss", "d_loss", "grad_norm"} <= set(parts)
    assert any(not torch.equal(before[k], v) for k, v in step.model.state_dict().items())
    assert step.weight_ema.updates == 2


def test_the_text_to_image_profile_applies_a_text_prior(tmp_path, capsys):
    repo = _repo(tmp_path)
    shutil.copy(ROOT / "profiles" / "text-to-image.yaml", repo / "profiles" / "text-to-image.yaml")
    assert main(["--repo", str(repo), "apply-profile", "profiles/text-to-image.yaml"]) == 0
    assert "train_prior.condition: 'class' -> 'text'" in capsys.readouterr().out
    prior = load_params(repo / "params.yaml").train_prior
    assert prior.condition == "text" and prior.kind == "ar" and len(prior.text.held_out_captions) == 8
    assert all(shapes.parse_caption(c) for c in prior.text.held_out_captions)  # evaluate can score each
