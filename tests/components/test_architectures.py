"""VQ-VAE-2, VQ-GAN's losses and discriminator schedule, LPIPS loading, checkpoints, and the
resumable training stream."""

import math

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import save_file

from components.checkpoint import compare_settings, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from components.config import parse_params
from components.data.images import encode_png
from components.data.lanes import Piece, pieces
from components.data.stream import StreamLayout, TrainingStream, assembled
from components.quantizers import QUANTIZERS
from components.tokenizers import VQVAE2, Tokenizer
from components.tokenizers.blocks import ConvShape
from components.tokenizers.lpips import LPIPS
from components.tokenizers.vqgan import LeCAM, PatchDiscriminator, adaptive_weight, discriminator_loss, generator_loss
from tests.conftest import TINY

VQ = QUANTIZERS["vq"]
FSQ = QUANTIZERS["fsq"]


def _vqvae2(top=None) -> VQVAE2:
    torch.manual_seed(0)
    return VQVAE2(VQ(codebook_size=16), top or VQ(codebook_size=16), ConvShape(8, 1, 1, 8), top_downsamples=1)


def test_vqvae2_levels_shapes_and_exact_decoding():
    model = _vqvae2().eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    out = model(x)
    assert out.indices["bottom"].shape == (3, 8, 8) and out.indices["top"].shape == (3, 4, 4)
    assert out.reconstruction.shape == x.shape
    # Decoding the indices gives exactly the forward pass's reconstruction.
    assert torch.allclose(model.decode_indices(out.indices), out.reconstruction, atol=1e-6)
    assert {k: v.shape for k, v in model.encode_indices(x).items()} == {k: v.shape for k, v in out.indices.items()}


def test_vqvae2_gradients_reach_both_encoders_and_the_top_decoder():
    model = _vqvae2(top=VQ(codebook_size=16, ema=False)).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model(x)
    ((out.reconstruction - x) ** 2).mean().add(out.quant_loss).backward()
    for part in (
        model.encoder,
        model.top_encoder,
        model.top_decoder,
        model.bottom_in,
        model.top_upsample,
        model.decoder,
    ):
        assert sum(p.grad.abs().sum() for p in part.parameters()) > 0
    assert {"codebook_usage_top", "codebook_usage_bottom", "codebook_usage"} <= set(out.parts)


def test_hierarchical_tokenizer_flattens_top_then_bottom(tmp_path):
    model = _vqvae2(top=FSQ(levels=[3, 3])).eval()
    config = {
        "arch": "vqvae2",
        "image_size": 16,
        "channels": 8,
        "num_downsamples": 1,
        "num_res_blocks": 1,
        "latent_dim": 8,
        "quantizer": VQ(codebook_size=16).model_dump(),
        "top_downsample": 2,
        "top_quantizer": FSQ(levels=[3, 3]).model_dump(),
    }
    tok = Tokenizer(model, config)
    assert tok.tiers == ("top", "bottom") and tok.token_columns == ["tokens_top", "tokens_bottom"]
    assert tok.column_grids == {"tokens_top": (4, 4), "tokens_bottom": (8, 8)} and tok.num_tokens == 16 + 64
    assert tok.codebook_size == 16 and tok.column_codebook_sizes == {"tokens_top": 9, "tokens_bottom": 16}
    assert tok.vocab_limits().tolist() == [9] * 16 + [16] * 64
    images = torch.rand(2, 3, 16, 16)
    indices = tok.encode(images)
    flat = tok.flatten(indices)
    assert torch.equal(flat[:, :16], indices["top"].reshape(2, -1)) and torch.equal(
        flat[:, 16:], indices["bottom"].reshape(2, -1)
    )
    back = tok.unflatten(flat)
    assert all(torch.equal(back[k], indices[k]) for k in indices)
    columns = tok.encode_columns(images)
    assert torch.equal(columns["tokens_top"], flat[:, :16])
    with pytest.raises(ValueError, match="dict of indices"):
        tok.decode(indices["bottom"])
    with pytest.raises(ValueError, match="tier 'top' outside"):
        tok.decode({"top": torch.full((1, 4, 4), 9), "bottom": indices["bottom"][:1]})
    tok.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.fingerprint == tok.fingerprint
    assert torch.equal(loaded.decode(indices), tok.decode(indices))


def test_adaptive_weight_equals_the_hand_computed_ratio():
    # A one-layer "decoder" y = W x: d||Wx - t||^2/dW = 2 (Wx - t) x^T and d(-v.Wx)/dW = -v x^T.
    W = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    x, t, v = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.3, -0.4])
    y = W @ x
    rec, adv = ((y - t) ** 2).sum(), -(v * y).sum()
    by_hand = torch.linalg.norm(2 * torch.outer(y.detach() - t, x)) / (torch.linalg.norm(torch.outer(-v, x)) + 1e-4)
    assert math.isclose(adaptive_weight(rec, adv, W).item(), by_hand.item(), rel_tol=1e-6)
    assert adaptive_weight(rec, adv, W, max_weight=2.0).item() == 2.0


def test_gan_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0])
    # hinge: mean(relu(1 - real)) + mean(relu(1 + fake)) = (0 + .5)/2 + (0 + 1)/2
    assert discriminator_loss("hinge", real, fake).item() == pytest.approx(0.75)
    assert generator_loss("hinge", fake).item() == pytest.approx(1.5)
    ns = torch.nn.functional.softplus
    assert discriminator_loss("non_saturating", real, fake).item() == pytest.approx(
        (ns(-real).mean() + ns(fake).mean()).item()
    )
    assert PatchDiscriminator(3, 8, 2)(torch.rand(2, 3, 16, 16)).shape == (2, 1, 2, 2)


def test_lecam_tracks_the_discriminator_means():
    lecam = LeCAM(decay=0.5)
    lecam.update(torch.tensor([2.0]), torch.tensor([-2.0]))
    assert lecam.ema_real.item() == 2.0 and lecam.ema_fake.item() == -2.0
    lecam.update(torch.tensor([0.0]), torch.tensor([0.0]))
    assert lecam.ema_real.item() == 1.0 and lecam.ema_fake.item() == -1.0
    # relu(real - ema_fake)^2 + relu(ema_real - fake)^2 = (0.5 + 1)^2 + (1 - 3)^+ ^2
    assert lecam.penalty(torch.tensor([0.5]), torch.tensor([3.0])).item() == pytest.approx(2.25)


def _trainer(disc_start: int):
    from components.tokenizers.training import build_step

    raw = {
        **TINY,
        "train_tokenizer": {
            **TINY["train_tokenizer"],
            "arch": "vqgan",
            "recon_loss": "l1",
            "vqgan": {"disc_start": disc_start, "disc_channels": 8, "disc_layers": 2, "lecam_weight": 0.1},
        },
    }
    torch.manual_seed(0)
    params = parse_params(raw)
    return build_step(params.train_tokenizer, params.shard.image_size, torch.device("cpu"))


def test_discriminator_is_not_updated_before_disc_start():
    trainer = _trainer(disc_start=2)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    before = {k: v.clone() for k, v in trainer.disc.state_dict().items()}
    for step in (1, 2):
        parts = trainer.step(images, step)
        assert "g_loss" not in parts and "d_loss" not in parts
    assert all(torch.equal(before[k], v) for k, v in trainer.disc.state_dict().items())
    assert not trainer.opt_d.state  # not even Adam's moments
    parts = trainer.step(images, 3)
    assert {"g_loss", "d_loss", "adaptive_weight", "lecam_penalty"} <= set(parts)
    assert parts["adaptive_weight"].item() > 0
    assert any(not torch.equal(before[k], v) for k, v in trainer.disc.state_dict().items())


def _lpips_file(path, naming: str):
    torch.manual_seed(0)
    state = {k: v.abs() if k.startswith("lin") else v for k, v in LPIPS().state_dict().items()}
    if naming == "lpips":  # the lpips package's names: net.slice{n}.{i}
        slices = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]
        renamed = {}
        for k, v in state.items():
            if k.startswith("features."):
                i = int(k.split(".")[1])
                n = next(s for s, (a, b) in enumerate(slices, 1) if a <= i < b)
                k = f"net.slice{n}.{i}.{k.split('.')[2]}"
            renamed[k] = v
        state = renamed
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


@pytest.mark.parametrize("naming", ["torchvision", "lpips"])
def test_lpips_loads_a_local_file_and_measures_distance(tmp_path, naming):
    _lpips_file(tmp_path / "lpips.safetensors", naming)
    lpips = LPIPS.load(tmp_path / "lpips.safetensors")
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    assert torch.allclose(lpips(x, x.detach()), torch.zeros(2), atol=1e-6)
    d = lpips(x, torch.rand(2, 3, 32, 32) * 2 - 1)
    assert (d > 0).all()
    d.sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in lpips.parameters())


def test_lpips_refuses_an_incomplete_file_and_config_needs_a_path(tmp_path):
    save_file({"features.0.weight": torch.zeros(64, 3, 3, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="missing features.0.bias"):
        LPIPS.load(tmp_path / "bad.safetensors")
    from components.config import ConfigError

    with pytest.raises(ConfigError, match="train_tokenizer.perceptual_weights: perceptual_weight is 0.5 but no LPIPS"):
        parse_params({"train_tokenizer": {"perceptual_weight": 0.5}})
    with pytest.raises(ConfigError, match="nope.safetensors not found"):
        parse_params(
            {"train_tokenizer": {"perceptual_weight": 0.5, "perceptual_weights": str(tmp_path / "nope.safetensors")}}
        )


def test_arch_options_are_checked_at_load():
    from components.config import ConfigError

    with pytest.raises(ConfigError, match="train_tokenizer.vqgan.disc_layers: 3 layers need images of at least 32"):
        parse_params({"shard": {"image_size": 16}, "train_tokenizer": {"arch": "vqgan"}})
    with pytest.raises(ConfigError, match="train_tokenizer.vqvae2.top_downsample"):
        parse_params(
            {
                "shard": {"image_size": 16},
                "train_tokenizer": {"arch": "vqvae2", "downsample": 4, "vqvae2": {"top_downsample": 8}},
            }
        )
    with pytest.raises(ConfigError, match="train_tokenizer.vqvae2.top_quantizer.levels"):
        parse_params(
            {"train_tokenizer": {"arch": "vqvae2", "vqvae2": {"top_quantizer": {"type": "vq", "levels": [8]}}}}
        )
    with pytest.raises(ConfigError, match="train_tokenizer.batch_size: 64 does not split evenly over ddp_workers=3"):
        parse_params({"train_tokenizer": {"ddp_workers": 3}})


def test_checkpoint_round_trip_and_settings_diff(tmp_path):
    torch.manual_seed(1)
    state = {
        "model": {"w": torch.randn(3)},
        "step": 7,
        "complete": False,
        "rng": [rng_state()],
        "history": [{"step": 1, "loss": 0.5}],
    }
    expected = torch.rand(3)
    save_checkpoint(tmp_path, state)
    loaded = load_checkpoint(tmp_path)
    assert (
        loaded["step"] == 7
        and torch.equal(loaded["model"]["w"], state["model"]["w"])
        and loaded["history"] == state["history"]
    )
    torch.rand(5), np.random.rand(), __import__("random").random()
    set_rng_state(loaded["rng"][0])
    assert torch.equal(torch.rand(3), expected)
    assert compare_settings({"lr": 0.1, "vqgan": {"disc_start": 5}}, {"lr": 0.2, "vqgan": {"disc_start": 5}}) == [
        "lr: 0.1 -> 0.2"
    ]
    assert load_checkpoint(tmp_path / "none") is None


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))

    torch.save({"format": 1, "x": Evil()}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="not a readable vqpipe checkpoint"):
        load_checkpoint(tmp_path)


@pytest.fixture(scope="module")
def labelled_shards(tmp_path_factory):
    """3 shards of 10 tiny images each; a sample's label is its number, so batches can be compared."""
    root = tmp_path_factory.mktemp("stream")
    urls = []
    for s in range(3):
        url = str(root / f"train-{s:06d}.tar")
        with wds.TarWriter(url) as sink:
            for i in range(10):
                n = s * 10 + i
                sink.write(
                    {"__key__": f"k{n:03d}", "png": encode_png(Image.new("RGB", (8, 8), (n, n, n))), "cls": str(n)}
                )
        urls.append(url)
    return urls


def _labels(urls, n, batch_size=8, lanes=4, world_size=1, loader_workers=0, shuffle_buffer=12, **kwargs):
    """The labels of the first `n` global batches: every rank's batches, concatenated in rank order."""
    from torch.utils.data import DataLoader

    per_rank = []
    for rank in range(world_size):
        layout = StreamLayout(batch_size, lanes, rank, world_size, loader_workers)
        stream = TrainingStream(urls, layout, shuffle_buffer=shuffle_buffer, seed=3, **kwargs)
        pieces = iter(DataLoader(stream, batch_size=None, num_workers=loader_workers))
        try:
            batches = assembled(pieces, stream.pieces_per_batch)
            per_rank.append([next(batches)[1].tolist() for _ in range(n)])
        finally:
            if loader_workers:
                pieces._shutdown_workers()
    return [sum((ranks[i] for ranks in per_rank), []) for i in range(n)]


@pytest.mark.parametrize("lanes", [4, 3])
def test_batches_depend_on_the_lanes_not_on_the_workers(labelled_shards, lanes):
    # 3 lanes: sizes 3, 3, 2 in a batch of 8, and a lane split between the two ranks.
    full = _labels(labelled_shards, 10, lanes=lanes)
    assert sorted(x for batch in full[:3] for x in batch) != list(range(24))  # shuffled
    for world_size, loader_workers in [(1, 2), (2, 0), (2, 3)]:
        assert _labels(labelled_shards, 10, lanes=lanes, world_size=world_size, loader_workers=loader_workers) == full
    assert _labels(labelled_shards, 10, lanes=2) != full  # the lanes do decide the order


@pytest.mark.parametrize("world_size, loader_workers", [(1, 0), (1, 2), (2, 1)])
def test_stream_resumes_at_a_batch_exactly(labelled_shards, world_size, loader_workers):
    full = _labels(labelled_shards, 12)
    for start in (3, 5):
        resumed = _labels(
            labelled_shards, 12 - start, world_size=world_size, loader_workers=loader_workers, start_batch=start
        )
        assert resumed == full[start:]


@pytest.mark.parametrize("lanes, batch_size", [(3, 6), (5, 10)])
def test_each_epoch_gives_every_sample_once(labelled_shards, lanes, batch_size):
    # 3 shards of 10: 3 lanes take a shard each; 5 lanes share every shard, 6 samples each.
    epoch = _labels(labelled_shards, 30 // batch_size, batch_size, lanes, world_size=2, shuffle_buffer=0)
    assert sorted(x for batch in epoch for x in batch) == list(range(30))


def test_lanes_split_the_batch_between_ranks():
    assert pieces(8, 3, 0, 2) == [Piece(0, 3, 0, 3), Piece(1, 3, 0, 1)]
    assert pieces(8, 3, 1, 2) == [Piece(1, 3, 1, 3), Piece(2, 2, 0, 2)]
    assert Piece(1, 3, 1, 3).span(4) == (13, 15)
    with pytest.raises(ValueError, match="between 1 and the batch size"):
        pieces(4, 8)
