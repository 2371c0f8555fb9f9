"""Published checkpoints into vqpipe exports: the same codes and images as the reference model,
every tensor accounted for, and each wrong checkpoint refused before anything is written."""

import argparse

import pytest
import torch

from components.tokenizers import Tokenizer
from components.tokenizers import published as pub
from components.tokenizers.published import CheckpointError, PublishedModel, convert_checkpoint, convert_state
from tests.reference_tokenizers import ReferenceVQ

# Small stand-ins for the published configurations (same layout, narrow widths).
TINY = {
    "llamagen": PublishedModel(32, (1, 2, 2), 64, 8, True, "-", "-", num_res_blocks=1, z_channels=32),
    "taming": PublishedModel(32, (1, 1, 2), 64, 16, False, "-", "-", num_res_blocks=1, z_channels=16),
}


@pytest.fixture(autouse=True)
def tiny_models(monkeypatch):
    for fmt, spec in TINY.items():
        monkeypatch.setitem(pub.MODELS[fmt], "tiny", spec)


def _reference(fmt: str, spec: PublishedModel = None, seed: int = 0) -> ReferenceVQ:
    spec = spec or TINY[fmt]
    torch.manual_seed(seed)
    model = ReferenceVQ(
        fmt, spec.channels, spec.ch_mult, spec.codebook_size, spec.latent_dim, spec.z_channels, spec.num_res_blocks
    ).eval()
    with torch.no_grad():  # GroupNorm's affine terms away from 1 and 0, so a swapped tensor shows
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("fmt", ["llamagen", "taming"])
def test_an_imported_tokenizer_encodes_and_decodes_as_the_reference(fmt, tmp_path):
    reference = _reference(fmt)
    ckpt = tmp_path / "ckpt.pt"
    entry = pub.STATE_ENTRY[fmt]
    torch.save({entry: reference.state_dict(), "steps": 100}, ckpt)

    config, model, notes = convert_checkpoint(fmt, ckpt, "tiny", image_size=32)
    Tokenizer(model, config).save(tmp_path / "export")
    tok = Tokenizer.load(tmp_path / "export")
    assert tok.grid == (8, 8) and tok.codebook_size == 64
    assert config["imported_from"]["format"] == fmt and len(config["imported_from"]["sha256"]) == 64

    images = torch.rand(3, 3, 32, 32)
    expected = reference.encode(images * 2 - 1)
    assert torch.equal(tok.encode(images), expected)
    decoded = ((reference.decode(expected) + 1) / 2).clamp(0, 1)
    assert torch.allclose(tok.decode(expected), decoded, atol=1e-5)
    if fmt == "taming":
        assert "training-only" in notes[-1]  # the discriminator's tensors: checked, left out


@pytest.mark.parametrize(("fmt", "model"), [("llamagen", "VQ-16"), ("taming", "imagenet-f16-16384")])
def test_the_published_layouts_map_tensor_for_tensor(fmt, model):
    reference = _reference(fmt, pub.MODELS[fmt][model])
    config, built, _ = convert_state(fmt, model, reference.state_dict())  # loads strictly: every tensor filled
    assert config["quantizer"]["codebook_size"] == 16384 and config["taming"]["attn_resolutions"] == [16]
    assert torch.equal(built.quantizer.codebook, reference.quantize.embedding.weight)


def test_a_missing_or_unknown_tensor_is_named():
    state = _reference("llamagen").state_dict()
    missing = dict(state)
    del missing["decoder.conv_blocks.0.attn.1.q.weight"]
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): decoder\.conv_blocks\.0\.attn\.1\.q\.weight"):
        convert_state("llamagen", "tiny", missing, image_size=32)
    extra = {**state, "encoder.conv_blocks.0.attn.0.q.weight": torch.zeros(32, 32, 1, 1)}
    with pytest.raises(CheckpointError, match=r"unknown tensor\(s\): encoder\.conv_blocks\.0\.attn\.0\.q\.weight"):
        convert_state("llamagen", "tiny", extra, image_size=32)
    reshaped = {**state, "quant_conv.bias": torch.zeros(9)}
    with pytest.raises(CheckpointError, match=r"quant_conv.bias: shape \(9,\), tiny has \(8,\)"):
        convert_state("llamagen", "tiny", reshaped, image_size=32)


def test_another_configuration_is_refused_naming_what_differs(monkeypatch):
    bigger = PublishedModel(32, (1, 2, 2), 128, 8, True, "-", "-", num_res_blocks=1, z_channels=32)
    monkeypatch.setitem(pub.MODELS["llamagen"], "tiny-128", bigger)
    state = _reference("llamagen", bigger).state_dict()
    with pytest.raises(CheckpointError) as err:
        convert_state("llamagen", "tiny", state, image_size=32)
    assert "codebook_size: 128 in the checkpoint, 64 in tiny" in str(err.value)
    assert "--model tiny-128" in str(err.value)


def test_the_wrong_format_is_refused_saying_which_it_is():
    with pytest.raises(CheckpointError, match="this is a taming checkpoint, not a llamagen one: use --format taming"):
        convert_state("llamagen", "tiny", _reference("taming").state_dict(), image_size=32)


def test_a_checkpoint_that_needs_unpickling_is_refused_with_how_to_strip_it(tmp_path):
    ckpt = tmp_path / "train.pt"
    torch.save({"model": _reference("llamagen").state_dict(), "args": argparse.Namespace(lr=1e-4)}, ckpt)
    with pytest.raises(CheckpointError) as err:
        convert_checkpoint("llamagen", ckpt, "tiny", image_size=32)
    message = str(err.value)
    assert "weights_only=True" in message and "torch.save({'model': c['model']}" in message
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
        convert_checkpoint("llamagen", tmp_path / "junk.pt", "tiny")
    torch.save({"weights": {"a": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no state dict where a taming checkpoint keeps it"):
        convert_checkpoint("taming", tmp_path / "other.pt", "tiny")
