"""network: taming — LlamaGen's VQ-16 size, the levels and attention asked for, settings that
cannot be built refused at load naming the key, and compact exports unchanged."""

import pytest
import torch

from components.config import ConfigError, parse_params
from components.tokenizers import build_model, export_config
from components.tokenizers.taming import AttentionBlock


def _params(image_size=256, **tokenizer):
    return parse_params({"shard": {"image_size": image_size}, "train_tokenizer": {"network": "taming", **tokenizer}})


VQ16 = {
    "channels": 128,
    "num_res_blocks": 2,
    "downsample": 16,
    "latent_dim": 8,
    "quantizer": {"type": "vq", "codebook_size": 16384, "ema": False, "cosine": True},
}


def test_llamagen_vq16_has_its_published_72m_parameters():
    params = _params(**VQ16)
    config = export_config(params.train_tokenizer, 256)
    assert config["taming"] == {
        "ch_mult": [1, 1, 2, 2, 4],  # LlamaGen's, from null and f16
        "attn_resolutions": [16],  # the coarsest level, from null
        "mid_attention": True,
        "z_channels": 256,
        "norm_groups": 32,
    }
    model = build_model(config)
    count = sum(p.numel() for p in model.parameters())
    assert 71.5e6 < count < 72.5e6  # LlamaGen reports ~72M for VQ-16
    # The encoder: 2 attention blocks at 16x16 and one in the middle; the decoder: 3 and one.
    assert sum(isinstance(m, AttentionBlock) for m in model.encoder.modules()) == 3
    assert sum(isinstance(m, AttentionBlock) for m in model.decoder.modules()) == 4


@pytest.mark.parametrize("downsample", [4, 8, 16])
def test_any_power_of_two_downsampling_with_attention_where_asked(downsample):
    params = _params(
        image_size=32,
        channels=8,
        num_res_blocks=1,
        downsample=downsample,
        latent_dim=4,
        taming={"attn_resolutions": [16], "mid_attention": False, "z_channels": 8, "norm_groups": 8},
    )
    model = build_model(export_config(params.train_tokenizer, 32)).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(x)
    grid = 32 // downsample
    assert out.reconstruction.shape == x.shape and out.indices["single"].shape == (2, grid, grid)
    attended = [i for i, level in enumerate(model.encoder.levels) if len(level.attentions)]
    assert attended == [1]  # 16 px is level 1 at 32 px, whatever the depth
    assert not isinstance(model.encoder.mid.attention, AttentionBlock)


def test_gradients_reach_the_encoder_through_attention_and_the_codes():
    params = _params(
        image_size=16, channels=8, num_res_blocks=1, latent_dim=4, taming={"z_channels": 8, "norm_groups": 8}
    )
    model = build_model(export_config(params.train_tokenizer, 16)).train()
    out = model(torch.rand(2, 3, 16, 16))
    out.reconstruction.square().mean().backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.encoder.levels[-1].attentions[0].q.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("tokenizer", "image_size", "key", "says"),
    [
        ({"downsample": 16, "taming": {"ch_mult": [1, 2, 4]}}, 256, "train_tokenizer.taming.ch_mult", "give 5"),
        ({"downsample": 8, "taming": {"attn_resolutions": [16, 64]}}, 256, "taming.attn_resolutions", "[16] never"),
        ({"downsample": 16}, 200, "train_tokenizer.downsample", "does not divide shard.image_size=200"),
        ({"channels": 40}, 256, "train_tokenizer.taming.norm_groups", "do not divide the widths [40"),
        ({"arch": "vqvae2"}, 256, "train_tokenizer.network", "vqvae2 uses the compact network"),
        ({"num_res_blocks": 0}, 256, "train_tokenizer.num_res_blocks", "at least 1"),
    ],
)
def test_settings_that_cannot_be_built_fail_at_load_naming_the_key(tokenizer, image_size, key, says):
    base = {"num_res_blocks": 1, "downsample": 8}
    with pytest.raises(ConfigError) as err:
        _params(image_size=image_size, **{**base, **tokenizer})
    assert key in str(err.value) and says in str(err.value)


def test_the_compact_network_is_still_the_default_and_its_config_unchanged():
    params = parse_params({})
    assert params.train_tokenizer.network == "compact"
    config = export_config(params.train_tokenizer, 32)
    # What 0.3 wrote (and fingerprinted): no network keys.
    assert "network" not in config and "taming" not in config
    assert type(build_model(config).encoder).__name__ == "Encoder"
