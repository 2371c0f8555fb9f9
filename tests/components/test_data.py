import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.data import shapes
from components.data import tokens as token_io
from components.data.images import DECODE_ERRORS, decode_image, resize_center_crop, to_rgb
from components.data.shards import assign_split


def test_shapes_are_deterministic_by_seed():
    a, label_a = shapes.render(7, seed=0)
    b, label_b = shapes.render(7, seed=0)
    c, _ = shapes.render(7, seed=1)
    assert a.size == (32, 32) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b)) and label_a == label_b
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    labels = {shapes.render(i)[1] for i in range(200)}
    assert labels == set(range(len(shapes.CLASSES)))


def test_shape_captions_say_what_the_pixels_show():
    gradients = 0
    for i in range(300):
        drawing = shapes.draw(i)
        pixels = np.asarray(drawing.image).reshape(-1, 3).astype(int)
        colour = np.round(shapes.PALETTE[drawing.colour] * 255).astype(int)
        words = drawing.caption.split(" ")
        assert words[:3] == ["a", shapes.COLOUR_NAMES[drawing.colour], shapes.CLASSES[drawing.label]]
        assert (np.abs(pixels - colour).max(axis=1) <= 1).sum() >= 9  # the shape's inside is its colour
        if len(drawing.background) == 1:
            assert drawing.caption.endswith(f"on a {shapes.COLOUR_NAMES[drawing.background[0]]} background")
            corner = np.round(shapes.PALETTE[drawing.background[0]] * 255).astype(int)
            assert np.abs(pixels[0] - corner).max() <= 1  # shapes never reach the corners
        else:
            gradients += 1
            a, b = (shapes.COLOUR_NAMES[c] for c in drawing.background)
            assert drawing.caption.endswith(f"on a {a} to {b} gradient")
        assert drawing.colour not in drawing.background
        assert np.array_equal(np.asarray(drawing.image), np.asarray(shapes.render(i)[0]))
    assert 0.2 < gradients / 300 < 0.4  # GRADIENT_SHARE


def test_split_is_deterministic_and_near_the_fraction():
    keys = [f"k{i}" for i in range(4000)]
    splits = [assign_split(k, 0.25, seed=0) for k in keys]
    assert splits == [assign_split(k, 0.25, seed=0) for k in keys]
    assert 0.22 < splits.count("val") / len(keys) < 0.28


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16", "1"])
def test_any_mode_becomes_rgb(mode):
    img = Image.new(mode, (40, 20))
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (40, 20)


def test_resize_center_crop():
    img = Image.new("RGB", (64, 32))
    img.paste((255, 0, 0), (0, 0, 16, 32))  # left quarter red: cropped away
    out = resize_center_crop(img, 16)
    assert out.size == (16, 16)
    assert np.asarray(out)[:, :, 0].max() < 50


def test_decode_rejects_truncated_and_non_images():
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buf, format="PNG")
    data = buf.getvalue()
    assert decode_image(data, 16).size == (16, 16)
    for bad in (data[: len(data) // 2], b"hello, not an image", b""):
        with pytest.raises(DECODE_ERRORS):
            decode_image(bad)


@pytest.mark.parametrize("codebook_size,arrow_type", [(256, "uint16"), (70000, "uint32")])
def test_token_parquet_round_trip_with_metadata(tmp_path, codebook_size, arrow_type):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, codebook_size, (5, 12))
    labels = np.array([0, 1, 2, 1, 0])
    rows = token_io.PartRows([f"k{i}" for i in range(5)], {"tokens": tokens}, labels)
    table = token_io.token_table(rows, token_io.PartLayout("f" * 64, codebook_size, (3, 4)))
    token_io.write_part(table, tmp_path / "part-train-000000.parquet")
    assert [p.name for p in tmp_path.iterdir()] == ["part-train-000000.parquet"]  # no temporary left behind
    schema = pq.read_schema(tmp_path / "part-train-000000.parquet")
    assert str(schema.field("tokens").type) == f"list<element: {arrow_type}>"
    assert schema.metadata[b"vqpipe.tokenizer_fingerprint"] == b"f" * 64
    assert json.loads(schema.metadata[b"vqpipe.grid"]) == {"tokens": [3, 4]}
    data = token_io.read_tokens([tmp_path / "part-train-000000.parquet"], fingerprint="f" * 64)
    assert np.array_equal(data.tokens, tokens) and np.array_equal(data.labels, labels)
    assert data.keys == [f"k{i}" for i in range(5)] and data.codebook_size == codebook_size
    with pytest.raises(token_io.TokenShardMismatch, match="re-tokenize"):
        token_io.read_tokens([tmp_path / "part-train-000000.parquet"], fingerprint="0" * 64)


def test_several_token_columns_flatten_position_by_position(tmp_path):
    """Product/residual parts carry one column per group/stage; the reader interleaves them
    position by position: [p0 g0, p0 g1, p1 g0, p1 g1, ...]."""
    group0 = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    group1 = group0 + 100
    rows = token_io.PartRows(["a", "b"], {"tokens_group0": group0, "tokens_group1": group1})
    table = token_io.token_table(rows, token_io.PartLayout("f" * 64, 70000, (2, 2)))
    token_io.write_part(table, tmp_path / "part-x.parquet")
    schema = pq.read_schema(tmp_path / "part-x.parquet")
    assert str(schema.field("tokens_group1").type) == "list<element: uint32>"
    assert list(json.loads(schema.metadata[b"vqpipe.grid"])) == ["tokens_group0", "tokens_group1"]
    data = token_io.read_tokens([tmp_path / "part-x.parquet"])
    assert data.columns == ["tokens_group0", "tokens_group1"] and data.labels is None
    assert data.tokens.tolist() == [[1, 101, 2, 102, 3, 103, 4, 104], [5, 105, 6, 106, 7, 107, 8, 108]]


def _two_tier_parts(tmp_path, fingerprint="f" * 64):
    """Two parts (5 and 4 rows) of a two-tier layout: top 1x2, bottom 2x2; labels in the first only."""
    from components.data.tokens import PartLayout, PartRows, token_table, write_part

    rng = np.random.default_rng(1)
    grid = {"tokens_top": (1, 2), "tokens_bottom": (2, 2)}
    layout = PartLayout(fingerprint, 16, grid, tiers=[["tokens_top"], ["tokens_bottom"]])
    paths = []
    for i, n in enumerate((5, 4)):
        tokens = {"tokens_top": rng.integers(0, 9, (n, 2)), "tokens_bottom": rng.integers(0, 16, (n, 4))}
        rows = PartRows([f"p{i}-{k}" for k in range(n)], tokens, np.arange(n) if i == 0 else None)
        table = token_table(rows, layout)
        write_part(table, tmp_path / f"part-{i}.parquet")
        paths.append(tmp_path / f"part-{i}.parquet")
    return paths


def test_token_batches_stream_across_parts_with_offset_and_image_markers(tmp_path):
    from components.data.tokens import iter_token_batches, read_tokens

    paths = _two_tier_parts(tmp_path)
    whole = read_tokens(paths)
    assert whole.tokens.shape == (9, 6) and whole.tiers == [["tokens_top"], ["tokens_bottom"]]
    batches = list(iter_token_batches(paths, 4, vocab_offset=100, boi=0, eoi=1))
    assert [len(b.keys) for b in batches] == [4, 4, 1]  # rows carried across the parts' boundary
    tokens = np.concatenate([b.tokens for b in batches])
    assert (tokens[:, 0] == 0).all() and (tokens[:, -1] == 1).all()
    assert np.array_equal(tokens[:, 1:-1], whole.tokens + 100)
    assert [k for b in batches for k in b.keys] == whole.keys
    assert np.concatenate([b.labels for b in batches]).tolist() == [0, 1, 2, 3, 4, -1, -1, -1, -1]
    plain = list(iter_token_batches(paths, 100))
    assert len(plain) == 1 and np.array_equal(plain[0].tokens, whole.tokens)


def test_token_batches_refuse_markers_inside_the_codes_and_other_tokenizers(tmp_path):
    from components.data.tokens import TokenShardMismatch, iter_token_batches

    paths = _two_tier_parts(tmp_path)
    with pytest.raises(ValueError, match=r"boi=105 must be >= 0 and outside the image codes \[100, 116\)"):
        next(iter_token_batches(paths, 4, vocab_offset=100, boi=105))
    with pytest.raises(TokenShardMismatch, match="not eeeeeeeeeeee"):
        next(iter_token_batches(paths, 4, fingerprint="e" * 64))


def test_captions_and_meta_travel_as_nullable_string_columns(tmp_path):
    from components.data.tokens import PartLayout, PartRows, token_table, write_part

    rows = PartRows(["a", "b"], {"tokens": np.zeros((2, 4), dtype=np.int64)}, captions=["a red circle", None])
    table = token_table(rows, PartLayout("f" * 64, 16, (2, 2)))
    write_part(table, tmp_path / "part.parquet")
    read = pq.read_table(tmp_path / "part.parquet")
    assert read.column("caption").to_pylist() == ["a red circle", None] and "meta" not in read.column_names
