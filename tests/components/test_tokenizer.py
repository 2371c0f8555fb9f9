import pytest
import torch

from components.quantizers import VQConfig
from components.tokenizers import VQVAE, Tokenizer
from components.tokenizers.blocks import ConvShape

CONFIG = {
    "arch": "vqvae",
    "image_size": 16,
    "channels": 8,
    "num_downsamples": 2,
    "num_res_blocks": 1,
    "latent_dim": 4,
    "quantizer": VQConfig(codebook_size=16).model_dump(),
}


def _tokenizer() -> Tokenizer:
    torch.manual_seed(0)
    model = VQVAE(VQConfig(codebook_size=16), ConvShape(8, 2, 1, 4))
    model.train()(torch.rand(4, 3, 16, 16) * 2 - 1)  # seeds the codebook from data
    return Tokenizer(model, dict(CONFIG))


def test_encode_decode_shapes_and_range():
    tok = _tokenizer()
    images = torch.rand(3, 3, 16, 16)
    indices = tok.encode(images)
    assert indices.shape == (3, 4, 4) and indices.dtype == torch.int64
    assert tok.grid == (4, 4) and tok.num_tokens == 16
    out = tok.decode(indices)
    assert out.shape == (3, 3, 16, 16) and out.min() >= 0 and out.max() <= 1
    # Decoding is a function of the indices alone: encode(decode(i)) need not equal i, but
    # decode(i) must be reproducible.
    assert torch.equal(tok.decode(indices), out)


def test_save_load_round_trip_keeps_fingerprint(tmp_path):
    tok = _tokenizer()
    tok.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.fingerprint == tok.fingerprint
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(loaded.encode(images), tok.encode(images))
    assert torch.allclose(loaded.decode(tok.encode(images)), tok.decode(tok.encode(images)))
    # Saved twice, the same fingerprint: it does not depend on the file's bytes.
    tok.save(tmp_path / "again")
    assert Tokenizer.load(tmp_path / "again").fingerprint == tok.fingerprint


def test_fingerprint_changes_with_weights_and_config():
    tok = _tokenizer()
    other = _tokenizer()
    assert other.fingerprint == tok.fingerprint
    with torch.no_grad():
        other.model.decoder.net[0].weight.add_(1e-3)
    assert Tokenizer(other.model, dict(CONFIG)).fingerprint != tok.fingerprint
    assert Tokenizer(tok.model, {**CONFIG, "image_size": 32}).fingerprint != tok.fingerprint


def test_bad_inputs_are_refused(tmp_path):
    tok = _tokenizer()
    with pytest.raises(ValueError, match="shape"):
        tok.encode(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="outside"):
        tok.decode(torch.full((1, 4, 4), 99))
    with pytest.raises(FileNotFoundError, match="config.json"):
        Tokenizer.load(tmp_path)


def test_bf16_autocast_keeps_the_quantizer_in_fp32():
    torch.manual_seed(0)
    model = VQVAE(VQConfig(codebook_size=16), ConvShape(8, 2, 1, 4)).train()
    seen = {}
    model.quantizer.register_forward_hook(lambda mod, args, out: seen.update(z=args[0].dtype, q=out.quantized.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(4, 3, 16, 16) * 2 - 1)
    assert seen == {"z": torch.float32, "q": torch.float32}
    assert model.quantizer.codebook.dtype == model.quantizer.embed_sum.dtype == torch.float32
    assert out.quant_loss.dtype == torch.float32 and torch.isfinite(out.quant_loss)
    (out.reconstruction.float().square().mean() + out.quant_loss).backward()
    assert all(p.grad is not None for p in model.encoder.parameters())
