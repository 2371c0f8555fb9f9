"""The text-conditional prior: caption ids, the model's layout, KV-cached sampling, learning a
known caption -> image mapping, guidance, the held-out stream, and the built-in captions'
parsing and colour measurement."""

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from components.config import SamplingOptions
from components.data import shapes
from components.data.captions import caption_matrix, caption_text
from components.data.token_stream import TokenStream
from components.priors import HierarchicalPrior, PriorConfig, Sampler, TransformerPrior
from components.priors.sampling import guided


def tiny(text_len=8, **kw) -> TransformerPrior:
    torch.manual_seed(0)
    sizes = {"vocab_size": 6, "seq_len": 4, "n_layer": 2, "n_head": 2, "n_embd": 32, "layout": ((2, 2, 1),)}
    return TransformerPrior(PriorConfig(**{**sizes, **kw}, text_len=text_len, text_vocab=256))


def test_captions_are_utf8_bytes_cut_and_right_aligned():
    ids = caption_matrix(["ab", "é", "abcdefghij", None, ""], 4)
    assert ids[0].tolist() == [-1, -1, 97, 98]
    assert ids[1].tolist() == [-1, -1, 0xC3, 0xA9] and caption_text(ids[1]) == "é"
    assert ids[2].tolist() == [97, 98, 99, 100]  # the first bytes kept
    assert (ids[3] == -1).all() and (ids[4] == -1).all()  # no caption: the unconditional input


def test_the_caption_changes_the_image_logits_and_pads_are_the_unconditional_input():
    model = tiny().eval()
    tokens = torch.randint(0, 6, (2, 4))
    a = model(tokens, caption_matrix(["red", "red"], 8))
    b = model(tokens, caption_matrix(["blue", "blue"], 8))
    assert a.shape == (2, 4, 6) and not torch.allclose(a, b)
    assert torch.equal(model(tokens, None), model(tokens, model.null_condition(2)))
    loss = model.loss(tokens, caption_matrix(["red", None], 8))
    loss.backward()
    assert model.tok_emb.weight.grad[model.text_offset + ord("r")].abs().sum() > 0  # text ids learn
    assert model.text_pos_emb.weight.grad.abs().sum() > 0


def test_bad_captions_and_configs_are_refused():
    model = tiny()
    with pytest.raises(ValueError, match=r"captions must be \(2, 8\)"):
        model(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"caption ids must be in \[0, 256\)"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 8), 300))
    with pytest.raises(ValueError, match="classes or on text, not both"):
        tiny(num_classes=3)
    with pytest.raises(ValueError, match="causal"):
        tiny(kind="maskgit")


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_cached_sampling_equals_uncached_for_a_text_prior(guidance):
    model = tiny()
    captions = caption_matrix(["a", "longer one", None], 8)
    options = SamplingOptions(guidance_scale=guidance, top_p=None)
    a = Sampler(model, options, torch.Generator().manual_seed(3)).draw(3, captions)
    b = Sampler(model, options, torch.Generator().manual_seed(3), use_cache=False).draw(3, captions)
    assert torch.equal(a, b)


def test_guidance_mixes_the_caption_and_the_empty_caption():
    model = tiny().eval()
    tokens = torch.randint(0, 6, (2, 4))
    cond = model(tokens, caption_matrix(["red", "red"], 8))
    uncond = model(tokens, None)
    mixed = guided(torch.cat([cond, uncond]).reshape(4, -1), 2.0).reshape(2, 4, 6)
    assert torch.allclose(mixed, uncond + 2.0 * (cond - uncond), atol=1e-6)
    with pytest.raises(ValueError, match="needs the captions"):
        Sampler(model, SamplingOptions(guidance_scale=2.0)).draw(2, None)


def test_a_text_prior_learns_which_image_each_caption_names():
    """Three captions, each naming one constant image; the empty caption is any of them. After
    training, every sample drawn for a caption is its image."""
    images = {"one": [1, 1, 1, 1], "two": [2, 3, 2, 3], "three": [5, 4, 3, 2]}
    model = tiny(text_len=6)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    names = list(images)
    for step in range(150):
        rows = torch.arange(48) % 3
        captions = caption_matrix([names[r] if (step + r) % 10 else None for r in rows.tolist()], 6)
        tokens = torch.tensor([images[names[r]] for r in rows.tolist()])
        opt.zero_grad()
        model.loss(tokens, captions).backward()
        opt.step()
    sampler = Sampler(model, SamplingOptions(temperature=0.5, top_p=None), torch.Generator().manual_seed(0))
    for name, image in images.items():
        drawn = sampler.draw(8, caption_matrix([name] * 8, 6))
        assert (drawn == torch.tensor(image)).all(), (name, drawn)


def test_a_hierarchical_text_prior_reads_the_caption_in_both_tiers():
    top = PriorConfig(
        vocab_size=4, seq_len=1, n_layer=1, n_head=1, n_embd=16, layout=((1, 1, 1),), text_len=4, text_vocab=256
    )
    bottom = replace(top, vocab_size=5, seq_len=4, layout=((1, 1, 1), (2, 2, 1)), prefix_len=1, prefix_vocab=4)
    model = HierarchicalPrior(top, bottom)
    assert model.conditioning == "text"
    captions = caption_matrix(["x", "yz"], 4)
    options = SamplingOptions(guidance_scale=2.0, top_p=None)
    a = Sampler(model, options, torch.Generator().manual_seed(1)).draw(2, captions)
    b = Sampler(model, options, torch.Generator().manual_seed(1), use_cache=False).draw(2, captions)
    assert torch.equal(a, b) and a.shape == (2, 5)
    with pytest.raises(ValueError, match="same captions"):
        HierarchicalPrior(top, replace(bottom, text_len=5))


def _part(path, captions, labels):
    n = len(captions)
    table = pa.table(
        {
            "key": [f"k{i}" for i in range(n)],
            "tokens": pa.array([[i % 7, 1] for i in range(n)], pa.list_(pa.uint16())),
            "label": pa.array(labels, pa.int32()),
            "caption": pa.array(captions, pa.string()),
        }
    )
    pq.write_table(table, path, row_group_size=5)
    return path


def test_the_stream_never_gives_held_out_captions_and_gives_every_other_row(tmp_path):
    captions = [f"caption {i % 6}" for i in range(40)]
    part = _part(tmp_path / "p.parquet", captions, [i % 4 for i in range(40)])
    held = frozenset({"caption 1", "caption 4"})
    stream = TokenStream([part], [["tokens"]], 4, lanes=2, seed=3, caption_len=12, held_out=held)
    seen = [row for lane in range(2) for row in stream.epoch(0, lane)]
    kept = [c for c in captions if c not in held]
    assert sorted(caption_text(torch.from_numpy(r[2])) for r in seen) == sorted(kept)
    tokens, labels, ids = next(iter(stream))
    assert tokens.shape == (4, 2) and ids.shape == (4, 12)
    assert not {caption_text(row) for row in ids} & held


def test_builtin_captions_parse_and_their_colours_measure_back():
    solid = 0
    for i in range(400):
        drawing = shapes.draw(i, seed=5)
        parsed = shapes.parse_caption(drawing.caption)
        if len(drawing.background) == 2:
            assert parsed is None  # a gradient has no one background colour
            continue
        solid += 1
        assert parsed == (drawing.label, drawing.colour, drawing.background[0])
        assert shapes.measure_colours(np.asarray(drawing.image)) == (drawing.colour, drawing.background[0])
    assert solid > 200
    assert shapes.parse_caption("a red blob on a white background") is None
    blank = np.full((16, 16, 3), 0.95)
    assert shapes.measure_colours(blank) == (-1, shapes.COLOUR_NAMES.index("white"))
