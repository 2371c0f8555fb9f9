"""The field's reconstruction metrics: rFID from running moments in a seeded random Inception-v3
(or the real one), PSNR on uint8-rounded images, and ADM-style .npz files."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch

from components.metrics.generation import FeatureMoments, frechet_from_moments
from components.metrics.inception import (
    feature_space_name,
    inception_features,
    random_inception,
    random_inception_size,
)
from components.metrics.npz import NpzWriter
from components.metrics.reconstruction import as_uint8_images, psnr, to_uint8


@pytest.fixture(scope="module")
def net():
    return random_inception(random_inception_size(16))


def _images(seed: int, n: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Smooth random images (a coarse grid upsampled), so features vary between them.
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)


def _rfid(net, a: torch.Tensor, b: torch.Tensor) -> float:
    ma, mb = FeatureMoments(), FeatureMoments()
    half = len(a) // 2
    for part in (slice(0, half), slice(half, None)):  # in batches, as evaluate streams them
        ma.add(inception_features(net, a[part]))
        mb.add(inception_features(net, b[part]))
    return frechet_from_moments(ma, mb)


def test_random_inception_is_seeded_and_keeps_its_scale(net):
    again = random_inception(random_inception_size(16))
    x = _images(0, 4)
    f, g = inception_features(net, x), inception_features(again, x)
    assert np.array_equal(f, g) and f.shape == (4, 2048)
    # He init keeps activations O(1) through the network (the default init would give ~1e-8).
    assert 0.1 < np.linalg.norm(f, axis=1).mean() < 100
    assert not np.array_equal(inception_features(random_inception(75, seed=1), x), f)
    assert random_inception_size(16) == 75 and random_inception_size(128) == 128 and random_inception_size(512) == 299
    assert feature_space_name(75) == "inception_v3_random_init(seed=0,input=75px)"


def test_rfid_is_zero_for_identical_sets_and_grows_with_a_shift(net):
    images = _images(0)
    assert _rfid(net, images, images.clone()) == pytest.approx(0.0, abs=1e-6)
    shifted = [_rfid(net, images, (images + shift).clamp(0, 1)) for shift in (0.05, 0.3)]
    assert 0 < shifted[0] < shifted[1]


def test_uint8_rounding_is_to_nearest_and_clamped():
    x = torch.tensor([-0.5, 0.0, 0.4 / 255, 0.6 / 255, 127.5 / 255 - 1e-4, 1.0, 1.7]).view(1, 1, 1, 7)
    assert to_uint8(x).flatten().tolist() == [0, 0, 0, 1, 127, 255, 255]
    assert torch.equal(as_uint8_images(x), to_uint8(x).float() / 255)
    # PSNR of a rounded image against its original is that of rounding error alone: >= 48 dB
    # (half a grey level at most), and a uint8 image rounds to itself.
    images = torch.rand(4, 3, 8, 8)
    assert (psnr(as_uint8_images(images), images) > 48).all()
    exact = to_uint8(images).float() / 255
    assert torch.equal(as_uint8_images(exact), exact)


def test_npz_is_uint8_nhwc_arr_0_read_back_by_numpy(tmp_path):
    images = torch.rand(10, 3, 6, 5)
    path = tmp_path / "out" / "samples.npz"
    with NpzWriter(path, tmp_path) as writer:
        writer.add(images[:4])
        writer.add(to_uint8(images[4:]))  # uint8 batches go in as they are
    with np.load(path) as npz:
        assert npz.files == ["arr_0"]
        arr = npz["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (10, 6, 5, 3)
    assert np.array_equal(arr, to_uint8(images).permute(0, 2, 3, 1).numpy())
    assert zipfile.ZipFile(path).namelist() == ["arr_0.npy"]
    assert list(tmp_path.glob("vqpipe-npz-*")) == []  # the scratch pixels are gone


def test_npz_writer_refuses_mixed_shapes_and_writes_nothing_on_error(tmp_path):
    path = tmp_path / "samples.npz"
    with pytest.raises(ValueError, match="must all be"), NpzWriter(path, tmp_path) as writer:
        writer.add(torch.rand(2, 3, 4, 4))
        writer.add(torch.rand(2, 3, 5, 4))
    assert not path.exists() and list(tmp_path.iterdir()) == []
