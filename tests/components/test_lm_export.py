"""The LM export's layout on hand-made parts: the vocabulary, caption ids from bytes, framing and
reading a .bin back whatever the window."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from components.data import lm_export as lm
from components.data.tokens import PartInfo, tokens_array


def _info(sizes: dict, grids: dict, tiers: list) -> PartInfo:
    return PartInfo("f" * 64, max(sizes.values()), grids, 3, tiers, column_sizes=sizes)


def test_the_vocabulary_puts_text_then_each_columns_codes_then_the_special_tokens():
    info = _info(
        {"tokens_top": 8, "tokens_bottom": 32},
        {"tokens_top": [1, 2], "tokens_bottom": [2, 2]},
        [["tokens_top"], ["tokens_bottom"]],
    )
    vocab = lm.Vocabulary.build(256, info)
    top, bottom = vocab.columns
    assert (top.offset, top.codebook_size, top.separator, top.tier) == (256, 8, None, 0)
    assert (bottom.offset, bottom.codebook_size, bottom.tier) == (264, 32, 1)
    assert vocab.special_tokens == {"boi": 296, "eoi": 297, "sep_tokens_bottom": 298, "pad": 299}
    assert bottom.separator == 298 and vocab.vocab_size == 300 and vocab.dtype == np.uint16
    assert vocab.image_length == 1 + 2 + 1 + 4 + 1
    assert lm.Vocabulary.from_meta(vocab.to_meta()) == vocab
    # Past 65,536 ids the arrays are uint32.
    big = lm.Vocabulary.build(0, _info({"tokens": 65535}, {"tokens": [2, 2]}, [["tokens"]]))
    assert big.vocab_size == 65535 + 3 and big.dtype == np.uint32


def test_byte_caption_ids_come_from_the_buffers_and_match_a_row_by_row_reference():
    captions = ["a red cross on a white background", None, "", "ünïcödé", "x" * 40]
    column = pa.array(captions, pa.string()).slice(0)  # a slice: the buffers start elsewhere
    sliced = pa.array(["skip", *captions], pa.string()).slice(1)
    for col in (column, sliced, pa.chunked_array([sliced[:2], sliced[2:]])):
        ids, lengths, counts = lm.caption_ids(col, len(captions), lm.ByteText(), max_tokens=12)
        expected = [(c or "").encode()[:12] for c in captions]
        assert lengths.tolist() == [len(e) for e in expected]
        assert bytes(ids.astype(np.uint8)) == b"".join(expected)
        assert vars(counts) == {"written": 4, "missing": 1, "truncated": 2, "invalid_utf8": 0}


def test_captions_that_are_not_utf8_are_replaced_and_counted():
    column = pa.array([b"ok", b"bad \xff\xfe end", None], pa.binary())
    ids, lengths, counts = lm.caption_ids(column, 3, lm.ByteText(), max_tokens=100)
    assert counts.invalid_utf8 == 1 and counts.written == 2 and counts.missing == 1
    second = bytes(ids[lengths[0] : lengths[0] + lengths[1]].astype(np.uint8)).decode()
    assert second == "bad \ufffd\ufffd end"


def _record(codes: np.ndarray, captions: list) -> pa.Table:
    return pa.table(
        {"key": [str(i) for i in range(len(codes))], "tokens": tokens_array(codes, 16), "caption": captions}
    )


def test_sequences_frame_every_image_and_read_back_from_a_bin_in_any_window(tmp_path):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (50, 4))
    captions = [None if i % 7 == 0 else "y" * int(rng.integers(0, 600)) for i in range(50)]
    vocab = lm.Vocabulary.build(256, _info({"tokens": 16}, {"tokens": [2, 2]}, [["tokens"]]))
    flat, lengths, counts = lm.sequences(_record(codes, captions), vocab, lm.ByteText(), max_caption_tokens=500)
    assert len(flat) == lengths.sum() and counts.truncated == sum(c is not None and len(c) > 500 for c in captions)
    path = tmp_path / "train.bin"
    flat.astype(vocab.dtype).tofile(path)
    for chunk in (7, 64, 1 << 20):  # captions longer than the window: it grows
        back = list(lm.iter_bin_sequences(path, vocab, chunk=chunk))
        assert np.array_equal(np.stack([s.codes["tokens"] for s in back]), codes)
        assert [bytes(s.caption_ids.astype(np.uint8)).decode() for s in back] == [(c or "")[:500] for c in captions]
    # Without captions every sequence is boi, the codes, eoi.
    bare, bare_lengths, _ = lm.sequences(_record(codes, captions), vocab, None, 500)
    assert (bare_lengths == vocab.image_length).all()
    assert np.array_equal(bare.reshape(50, -1)[:, 1:-1] - 256, codes)
    # A file cut inside an image is an error naming it, not a short read.
    flat[: lengths[:3].sum() + 3].astype(vocab.dtype).tofile(path)
    with pytest.raises(lm.ExportError, match="ends inside an image"):
        list(lm.iter_bin_sequences(path, vocab, chunk=1 << 20))


def test_codes_outside_their_codebook_are_refused():
    vocab = lm.Vocabulary.build(0, _info({"tokens": 16}, {"tokens": [2, 2]}, [["tokens"]]))
    with pytest.raises(lm.ExportError, match=r"codes outside \[0, 16\)"):
        lm.sequences(_record(np.full((2, 4), 16), [None, None]), vocab, None, 10)
