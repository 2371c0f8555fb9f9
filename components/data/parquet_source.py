"""`parquet:SPEC`: a Parquet image dataset, in the Hugging Face layout.

SPEC: local paths or fsspec URLs of Parquet files, brace patterns, globs, `@FILE` lists, or a
directory (every `*.parquet` below it). Each file is one unit, read a record batch at a time.

Columns (`shard.parquet`): `image_column` holds the encoded image as bytes, or as a
`{bytes, path}` struct whose null `bytes` means "read `path`" (relative to the Parquet file's
directory); `label_column` (optional) an integer or string class, named by the Hugging Face
`ClassLabel` names in the schema metadata when present, else by its sorted distinct values;
`caption_column` (optional) a string. A missing column or one of the wrong type is a
`SourceError` naming it and the columns there are, raised when the source opens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from components.data.corpus import ShardUnreadable, expand_inputs, stat_input
from components.data.files import FileTooLarge, read_at_most, read_regular_file
from components.data.limits import DEFAULT_LIMITS, ReadLimits
from components.data.units import RawSample, SourceError, SourceUnit

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
READ_ROWS = 64  # rows per record batch: memory is bounded by this many images
# What pyarrow raises for a corrupt file: OSError, ArrowException, and a UnicodeDecodeError (a
# ValueError) when a corrupt footer's column name is not UTF-8 (found by tests/fuzzing.py).


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_label(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or _is_text(t)


def _image_type_ok(t: pa.DataType) -> bool:
    if _is_bytes(t):
        return True
    if not pa.types.is_struct(t):
        return False
    fields = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
    return "bytes" in fields and _is_bytes(fields["bytes"]) and ("path" not in fields or _is_text(fields["path"]))


def _expand(spec: str, allow_pipe_in_lists: bool = False) -> list[str]:
    """The Parquet files a spec names; a directory stands for every *.parquet below it."""
    files: list[str] = []
    for url in expand_inputs(spec, allow_pipe_in_lists):
        if url.startswith("pipe:"):
            raise ValueError(f"{url!r}: a Parquet source reads files, not pipe: commands")
        fs, path = fsspec.core.url_to_fs(url)
        if fs.isdir(path):
            found = sorted(fs.glob(path.rstrip("/") + "/**/*.parquet"))
            files += [p if "://" not in url else fs.unstrip_protocol(p) for p in found]
        else:  # local paths absolute: Ray workers do not share this process's working directory
            files.append(url if "://" in url else str(Path(url).expanduser().resolve()))
    return list(dict.fromkeys(files))


class ParquetImages:
    """The files a Parquet spec names. `check=False` only lists them (for the source's
    fingerprint): no schema is read, and the source cannot be sampled."""

    def __init__(self, spec: str, options, check: bool = True, limits: ReadLimits = DEFAULT_LIMITS):
        self.options = options
        self.limits = limits
        try:
            self.files = _expand(spec, limits.allow_pipe_in_lists)
        except (ValueError, OSError) as err:
            raise SourceError(f"shard.source parquet:{spec}: {err}") from None
        if not self.files:
            raise SourceError(f"shard.source parquet:{spec} names no Parquet files")
        self.description = f"parquet:{spec}"
        self.stems = _stems(self.files)
        self.classes, self.class_ids = None, None
        if not check:
            return
        schemas = [self._schema(f) for f in self.files]
        for name, schema in zip(self.files, schemas, strict=True):
            self._check(name, schema)
        self.classes, self.class_ids = self._classes(schemas[0])

    def _schema(self, name: str) -> pa.Schema:
        try:
            with fsspec.open(name, "rb") as f:
                return pq.read_schema(f)
        except (OSError, pa.ArrowException, ValueError) as err:
            raise SourceError(f"shard.source: cannot read the Parquet schema of {name}: {err}") from None

    def _check(self, name: str, schema: pa.Schema) -> None:
        o = self.options
        wanted = [("image_column", o.image_column, _image_type_ok, "bytes, or a struct of bytes and path")]
        if o.label_column:
            wanted.append(("label_column", o.label_column, _is_label, "an integer or a string"))
        if o.caption_column:
            wanted.append(("caption_column", o.caption_column, _is_text, "a string"))
        for key, column, ok, expected in wanted:
            if column not in schema.names:
                raise SourceError(
                    f"shard.parquet.{key}: {name} has no column {column!r} (its columns: {', '.join(schema.names)})"
                )
            if not ok(schema.field(column).type):
                raise SourceError(
                    f"shard.parquet.{key}: column {column!r} of {name} is {schema.field(column).type}, "
                    f"not {expected} (its columns: {', '.join(schema.names)})"
                )

    def _classes(self, schema: pa.Schema) -> tuple[list[str] | None, dict | None]:
        """Class names and value -> class id: ClassLabel names from the schema metadata when
        present, else the sorted distinct values of the label column over every file."""
        column = self.options.label_column
        if not column:
            return None, None
        names = _class_label_names(schema, column)
        if names is not None and pa.types.is_integer(schema.field(column).type):
            return names, {i: i for i in range(len(names))}
        values: set = set()
        for name in self.files:
            try:
                with fsspec.open(name, "rb") as f:
                    values |= {v for v in pq.read_table(f, columns=[column]).column(0).unique().to_pylist()}
            except (OSError, pa.ArrowException, ValueError) as err:  # every file's classes count: none left out
                raise SourceError(
                    f"shard.parquet.label_column: cannot read the labels of {name} to number the classes: {err}"
                ) from None
        ordered = sorted(v for v in values if v is not None)
        return [str(v) for v in ordered], {v: i for i, v in enumerate(ordered)}

    def units(self, plan=None) -> tuple[list[SourceUnit], list]:
        return [SourceUnit(i, name, name) for i, name in enumerate(self.files)], []

    def samples(self, unit: SourceUnit) -> Iterator[RawSample]:
        o = self.options
        columns = [c for c in (o.image_column, o.label_column, o.caption_column) if c]
        stem, row = self.stems[unit.index], 0
        try:
            with fsspec.open(unit.ref, "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=READ_ROWS, columns=columns):
                    data = {c: batch.column(c).to_pylist() for c in dict.fromkeys(columns)}
                    for i in range(batch.num_rows):
                        yield self._sample(unit.ref, f"{stem}-{row:08d}", row, {c: v[i] for c, v in data.items()})
                        row += 1
        except FileNotFoundError as err:
            raise ShardUnreadable(unit.name, f"no such file ({err})") from err
        except (OSError, pa.ArrowException, ValueError) as err:
            raise ShardUnreadable(unit.name, f"{type(err).__name__}: {err}") from err  # ValueError: a name not UTF-8

    def _sample(self, file: str, key: str, row: int, values: dict) -> RawSample:
        o, where = self.options, f"{file}#{row}"
        meta: dict = {"source": where}
        label = None
        if o.label_column and values[o.label_column] is not None:
            label = self.class_ids.get(values[o.label_column])
        caption = values[o.caption_column] if o.caption_column else None
        image, reject = values[o.image_column], None
        if isinstance(image, dict):
            if image.get("path"):
                meta["path"] = image["path"]
            image, reject = self._struct_image(file, image)
        elif image is None:
            reject = "no image (null)"
        return RawSample(key, where, image, label, caption, meta, reject)

    def _struct_image(self, file: str, value: dict) -> tuple[bytes | None, str | None]:
        if value.get("bytes") is not None:
            return value["bytes"], None
        path = value.get("path")
        if not path:
            return None, "no image (null bytes and path)"
        if "://" not in path and not path.startswith("/"):
            path = f"{file.rsplit('/', 1)[0]}/{path}" if "/" in file else path
        limit = self.limits.max_file_bytes
        try:
            if "://" not in path or path.startswith("file://"):
                return read_regular_file(Path(path.removeprefix("file://")), limit), None
            with fsspec.open(path, "rb") as f:
                return read_at_most(f, limit), None
        except FileTooLarge as err:
            return None, f"image file {value['path']!r}: {err}"
        except OSError as err:
            return None, f"image file {value['path']!r} unreadable: {err}"

    def listing(self) -> Iterator[tuple[str, int, str]]:
        for name in self.files:
            yield (name, *stat_input(name))


def _class_label_names(schema: pa.Schema, column: str) -> list[str] | None:
    """The `ClassLabel` names Hugging Face datasets keep in the schema metadata, if any."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][column]
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return [str(n) for n in names] if isinstance(names, list) else None


def _stems(files: list[str]) -> list[str]:
    """A short, unique, dot-free name per file (keys are STEM-ROW): the path below the files'
    common directory, without `.parquet`."""
    paths = [PurePosixPath(f.split("://", 1)[-1]) for f in files]
    common = len(paths[0].parts) - 1
    for p in paths[1:]:
        common = min(common, len(p.parts) - 1)
        while common and p.parts[:common] != paths[0].parts[:common]:
            common -= 1
    return [_UNSAFE.sub("_", "/".join(p.parts[common:]).removesuffix(".parquet")) for p in paths]
