"""Seeded corruptions of the inputs vqpipe reads, and the check that the readers survive them.

`cases(n, seed)` gives `n` cases (a name and the bytes of a tar shard, or of a Parquet file),
each a corruption of a small valid corpus: bit flips, truncations at every kind of boundary
(inside a header, at a header, inside a member's data, inside the end-of-archive blocks), tar
header edits (declared sizes far past the end, member types, names: dotfiles, no extension,
bytes that are not UTF-8, repeated names, checksums), and images inside an intact tar that are
themselves corrupted (flipped, cut, header sizes edited to billions of pixels). `check(case,
workdir)` runs a case through both readers, the `shard` stage's (`TarShards`/`ParquetImages`
and `write_unit`) and `vqpipe tokenize`'s (`decoded_samples`), and returns what happened, after
asserting the accounting: inputs = written + rejected, every reject with a reason, the written
tars reading back with exactly the written samples, and nothing staged left when a shard is
unreadable. Used by tests/components/test_fuzz_readers.py and benchmarks/fuzz_readers.py.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from components.data.corpus import ShardUnreadable, read_shard
from components.data.limits import ReadLimits
from components.data.shard_writer import ShardLayout, write_unit
from components.data.tar_source import TarShards
from components.data.tokenization import decoded_samples

LIMITS = ReadLimits(max_image_pixels=1 << 20, max_member_bytes=1 << 20, pipe_idle_timeout=5, shard_timeout=20)
LAYOUT = ShardLayout(image_size=8, val_fraction=0.5, seed=0, samples_per_shard=4, max_image_pixels=1 << 20)


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "tar" | "parquet"
    data: bytes


def _image(rng: np.random.Generator, fmt: str) -> bytes:
    h, w = (int(x) for x in rng.integers(6, 24, 2))
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format={"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "bmp": "BMP"}[fmt])
    return buf.getvalue()


def _members(rng: np.random.Generator, samples: int = 5) -> list[tuple[str, bytes]]:
    out = []
    for i in range(samples):
        fmt = ("png", "jpg", "webp", "bmp")[i % 4]
        out.append((f"s{i:03d}.{fmt}", _image(rng, fmt)))
        out.append((f"s{i:03d}.cls", str(i % 3).encode()))
        if i % 2:
            out.append((f"s{i:03d}.txt", f"caption {i}".encode()))
            out.append((f"s{i:03d}.json", json.dumps({"i": i}).encode()))
    return out


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _headers(data: bytes) -> list[int]:
    """Offsets of the member headers of an intact tar."""
    offsets, pos = [], 0
    while pos + 512 <= len(data) and data[pos : pos + 512].strip(b"\0"):
        offsets.append(pos)
        size = int(data[pos + 124 : pos + 136].strip(b"\0 ") or b"0", 8)
        pos += 512 + -(-size // 512) * 512
    return offsets


def _flip(rng: np.random.Generator, data: bytes, flips: int) -> bytes:
    out = bytearray(data)
    for pos in rng.integers(0, len(out), flips):
        out[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def _with_checksum(header: bytearray) -> bytearray:
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    return header


def _edit_header(rng: np.random.Generator, data: bytes) -> tuple[str, bytes]:
    out = bytearray(data)
    pos = int(rng.choice(_headers(data)))
    header = bytearray(out[pos : pos + 512])
    what = int(rng.integers(0, 6))
    if what == 0:  # a declared size far past the end of the shard
        size = int(rng.choice([1 << 20, 1 << 33, 8**11 - 1]))
        header[124:136] = f"{size:011o}\0".encode()
        name = f"size {size}"
    elif what == 1:  # another member type
        kind = bytes([int(rng.choice(list(b"0123456gxLKV")))])
        header[156:157] = kind
        name = f"type {kind!r}"
    elif what == 2:  # an odd name
        odd = [b".hidden", b"noext", b"key.", b"a/b/../c.png", b"\xff\xfe.png", b"x" * 99, b"k.PNG.gz", b"s000.png"]
        new = odd[int(rng.integers(0, len(odd)))]
        header[0:100] = new.ljust(100, b"\0")
        name = f"name {new[:20]!r}"
    elif what == 3:  # a bad checksum
        header[148:156] = b"0000000\0"
        out[pos : pos + 512] = header
        return "bad checksum", bytes(out)
    elif what == 4:  # garbage in the size field
        header[124:136] = bytes(rng.integers(0, 256, 12, dtype=np.uint8))
        name = "garbage size"
    else:  # a negative or base-256 size
        header[124:136] = b"\xff" * 12
        name = "base-256 size"
    out[pos : pos + 512] = _with_checksum(header)
    return f"header {name}", bytes(out)


def _truncate(rng: np.random.Generator, data: bytes) -> tuple[str, bytes]:
    headers = _headers(data)
    pos = int(rng.choice(headers))
    where = int(rng.integers(0, 5))
    if where == 0:
        cut, name = pos, "at a header"
    elif where == 1:
        cut, name = pos + int(rng.integers(1, 512)), "inside a header"
    elif where == 2:
        cut, name = pos + 512 + int(rng.integers(0, 64)), "inside a member"
    elif where == 3:
        end = headers[-1] + 512 + -(-int(data[headers[-1] + 124 : headers[-1] + 136].strip(b"\0 "), 8) // 512) * 512
        cut, name = end + int(rng.integers(0, len(data) - end)), "inside the end blocks"
    else:
        cut, name = int(rng.integers(0, len(data))), "anywhere"
    return f"truncated {name}", data[: min(cut, len(data))]


def _bad_image(rng: np.random.Generator, image: bytes) -> tuple[str, bytes]:
    what = int(rng.integers(0, 4))
    if what == 0:
        return "image bit flips", _flip(rng, image, int(rng.integers(1, 16)))
    if what == 1:
        return "image truncated", image[: int(rng.integers(0, len(image)))]
    if what == 2 and image.startswith(b"\x89PNG"):  # IHDR edited to billions of pixels, CRC fixed
        out = bytearray(image)
        out[16:24] = struct.pack(">II", *(int(v) for v in rng.integers(40_000, 2_000_000, 2)))
        out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
        return "png header of a huge image", bytes(out)
    return "random bytes", bytes(rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8))


def _parquet(rng: np.random.Generator) -> bytes:
    images = [_image(rng, ("png", "jpg")[i % 2]) for i in range(4)]
    table = pa.table({"image": images, "label": [0, 1, 0, 2], "caption": ["a", None, "c", "d"]})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=2)
    return buf.getvalue()


def cases(n: int, seed: int = 0) -> Iterator[Case]:
    """`n` corrupted inputs, the same for the same seed."""
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        members = _members(rng)
        data = _tar(members)
        kind = i % 10
        if kind in (0, 1):
            flips = int(rng.integers(1, 9))
            yield Case(f"{i}: {flips} bit flips", "tar", _flip(rng, data, flips))
        elif kind in (2, 3):
            yield Case(f"{i}: " + (t := _truncate(rng, data))[0], "tar", t[1])
        elif kind in (4, 5):
            yield Case(f"{i}: " + (h := _edit_header(rng, data))[0], "tar", h[1])
        elif kind in (6, 7):
            j = int(rng.integers(0, len(members)))
            while not members[j][0].endswith(("png", "jpg", "webp", "bmp")):
                j = (j + 1) % len(members)
            name, image = _bad_image(rng, members[j][1])
            members[j] = (members[j][0], image)
            yield Case(f"{i}: {name} ({members[j][0]})", "tar", _tar(members))
        elif kind == 8:  # odd member names and repeats in an intact tar
            extra = [(".DS_Store", b"x"), ("README", b"x"), ("s001.cls", b"99999999999"), ("s000.png", members[0][1])]
            k = int(rng.integers(0, len(extra)))
            members.insert(int(rng.integers(0, len(members) + 1)), extra[k])
            yield Case(f"{i}: member {extra[k][0]!r} inserted", "tar", _tar(members))
        else:
            pdata = _parquet(rng)
            if rng.random() < 0.5:
                yield Case(f"{i}: parquet bit flips", "parquet", _flip(rng, pdata, int(rng.integers(1, 9))))
            else:
                yield Case(f"{i}: parquet truncated", "parquet", pdata[: int(rng.integers(0, len(pdata)))])


def check(case: Case, workdir: Path) -> str:
    """Run `case` through the readers (see the module doc); what happened, for a tally."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "out"
    out.mkdir(exist_ok=True)
    if case.kind == "parquet":
        return _check_parquet(case, workdir, out)
    path = workdir / "in.tar"
    path.write_bytes(case.data)
    source = TarShards(str(path), LIMITS)
    result = write_unit(source, source.units()[0][0], out, LAYOUT, retries=0)
    shard = _account(result, out)
    try:
        decoded = list(decoded_samples(str(path), 8, 2, 8, LIMITS))
    except ShardUnreadable:
        assert result.error is not None, f"{case.name}: tokenize could not read a shard the shard stage read"
        return shard
    assert result.error is None, f"{case.name}: tokenize read a shard the shard stage could not"
    assert len(decoded) == result.inputs, f"{case.name}: {len(decoded)} samples read by tokenize, {result.inputs}"
    for d in decoded:
        assert (d.image is None) != (d.reject is None) and (d.reject is None or d.reject.strip()), case.name
    return shard


def _check_parquet(case: Case, workdir: Path, out: Path) -> str:
    from components.data.parquet_source import ParquetImages
    from components.data.units import SourceError
    from components.settings import ParquetOptions

    path = workdir / "in.parquet"
    path.write_bytes(case.data)
    options = ParquetOptions(image_column="image", label_column="label", caption_column="caption")
    try:
        source = ParquetImages(str(path), options, limits=LIMITS)
    except SourceError:
        return "parquet refused at open"
    result = write_unit(source, source.units()[0][0], out, LAYOUT, retries=0)
    return "parquet " + _account(result, out)


def _account(result, out: Path) -> str:
    staged = sorted(p.name for p in out.iterdir())
    if result.error is not None:
        assert not staged, f"an unreadable unit left {staged}"
        assert result.error.strip()
        return "unreadable"
    written = sum(s.samples for s in result.outputs)
    assert result.inputs == written + len(result.rejects), (result.inputs, written, len(result.rejects))
    assert all(r.reason.strip() for r in result.rejects)
    assert sorted(s.file for s in result.outputs) == staged
    back = sum(1 for s in result.outputs for _ in read_shard(str(out / s.file)))
    assert back == written, (back, written)
    for s in result.outputs:
        (out / s.file).unlink()
    return "read, some rejected" if result.rejects else "read whole"
