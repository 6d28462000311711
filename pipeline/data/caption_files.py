"""Caption sources: local files (.txt .csv .tsv .jsonl .parquet) and datasets hub sets, read into
lists of strings with errors that name the file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import DeprojectorError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")


SUPPORTED_SUFFIXES = (".txt", *TABLE_SUFFIXES)


TOKENIZE_BATCH = 4096  # captions per tokenizer call in the cleaning


class CaptionSourceError(DeprojectorError, ValueError):
    """A caption source cannot be read; the message names the file, line or column."""


def _decode(path: Path) -> str:
    """A UTF-8 text file's content, without a BOM; a bad byte or a NUL is reported with its
    line, its byte within the line and its byte offset in the file."""
    data = path.read_bytes()
    offset = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        nul = raw.find(b"\x00")
        if nul >= 0:
            raise CaptionSourceError(
                f"{path}:{number}: contains a NUL byte (byte {nul + 1} of the line, offset "
                f"{offset + nul} in the file); expected UTF-8 text"
            )
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise CaptionSourceError(
                f"{path}:{number}: not valid UTF-8 (byte {err.start + 1} of the line, offset "
                f"{offset + err.start} in the file: {raw[err.start : err.start + 1]!r}); "
                f"re-encode the file as UTF-8"
            ) from err
        offset += len(raw) + 1
    return data.decode("utf-8").removeprefix("\ufeff")


def _lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file, split at "\n" (and "\r\n") only.

    Not str.splitlines: it also splits at U+2028, U+2029, U+0085, \x1c-\x1e, \v and \f,
    which may sit inside a caption (or a JSON string) and end no record. The cleaning turns
    them into spaces like any other whitespace."""
    lines = _decode(path).split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    return [line.removesuffix("\r") for line in lines]


def _not_a_string(value: object) -> str:
    """How a JSON / Arrow / Python value that is not a caption text is named in an error."""
    kind = {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        list: "an array",
        dict: "an object",
    }.get(type(value), f"a {type(value).__name__}")
    shown = json.dumps(value) if isinstance(value, (bool, int, float, list, dict)) else repr(value)
    return f"{kind} ({shown[:60]}{'...' if len(shown) > 60 else ''})"


def _read_delimited(path: Path, column: str, delimiter: str) -> list[str]:
    """Rows of a CSV (RFC 4180 quoting) or TSV (no quoting: a '"' is an ordinary character)
    file with a header row. A row whose number of fields differs from the header's, or a
    quote that is never closed, is an error naming the line: never a silent merge of rows."""
    import csv
    import io

    text = _decode(path)
    tsv = delimiter == "\t"
    reader = csv.reader(
        io.StringIO(text, newline=""),
        delimiter=delimiter,
        strict=True,
        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL,
    )
    # The csv module refuses fields over 128 KiB; an over-long caption is the cleaning's to
    # drop and count, like any other.
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))
    header: list[str] | None = None
    index, texts = 0, []
    try:
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                raise CaptionSourceError(
                    _csv_error(path, start, reader.line_num, str(err))
                ) from err
            if not row:
                continue  # a blank line
            if header is None:
                header = row
                if column not in header:
                    raise CaptionSourceError(
                        f"{path}:{start}: no column {column!r} in the header (columns: "
                        f"{', '.join(header)}); set captions.column"
                    )
                index = header.index(column)
                continue
            if len(row) != len(header):
                hint = (
                    "a tab inside a caption? TSV has no quoting"
                    if tsv
                    else "a ',' in a caption that is not quoted? quote the field"
                )
                raise CaptionSourceError(
                    f"{path}:{start}: {len(row)} fields, the header has {len(header)} "
                    f"({', '.join(header)}); {hint}"
                )
            texts.append(row[index])
    finally:
        csv.field_size_limit(limit)
    if header is None:
        raise CaptionSourceError(f"{path}: empty file (expected a header row with {column!r})")
    return texts


def _csv_error(path: Path, start: int, end: int, message: str) -> str:
    span = f" (the record runs to line {end})" if end > start else ""
    if "unexpected end of data" in message:
        rest = f"lines {start}-{end} (the rest of the file)" if end > start else "the line"
        return (
            f"{path}:{start}: a quoted field that starts in this record is never closed: "
            f"{rest} would be one caption. Close the quote, or write a '\"' inside a "
            f"quoted field as '\"\"'"
        )
    return (
        f"{path}:{start}: malformed quoting ({message}){span}: a quoted field must end "
        f"with '\"' right before the delimiter or the line end, with '\"\"' for a quote "
        f"inside it"
    )


def _read_jsonl(path: Path, column: str) -> list[str]:
    texts = []
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            texts.append("")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CaptionSourceError(
                f"{path}:{number}: not valid JSON: {err.msg} (column {err.colno})"
            ) from err
        if not isinstance(record, dict) or column not in record:
            raise CaptionSourceError(
                f"{path}:{number}: expected an object with the field {column!r}; "
                f"set captions.column"
            )
        value = record[column]
        if value is not None and not isinstance(value, str):
            raise CaptionSourceError(
                f"{path}:{number}: field {column!r} is {_not_a_string(value)}, expected a "
                f"string (the caption text)"
            )
        texts.append(value or "")
    return texts


def _is_text_type(arrow_type: pa.DataType) -> bool:
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)
    return (
        pa.types.is_string(arrow_type)
        or pa.types.is_large_string(arrow_type)
        or is_view(arrow_type)
    )


def _read_parquet(path: Path, column: str) -> list[str]:
    try:
        schema = pq.read_schema(path)
        if column not in schema.names:
            raise CaptionSourceError(
                f"{path}: no column {column!r} (columns: {', '.join(schema.names)}); "
                f"set captions.column"
            )
        arrow_type = schema.field(column).type
        if not _is_text_type(arrow_type):
            raise CaptionSourceError(
                f"{path}: column {column!r} has the Arrow type {arrow_type}, expected strings "
                f"(string or large_string); set captions.column to the caption column"
            )
        table = pq.read_table(path, columns=[column])
    except (pa.ArrowInvalid, OSError) as err:
        raise CaptionSourceError(f"{path}: not a readable Parquet file: {err}") from err
    return ["" if v is None else v for v in table.column(column).to_pylist()]


EMPTY = {
    ".txt": "one caption per line",
    ".jsonl": "one JSON object per line",
    ".csv": "a header row and one caption per row",
    ".tsv": "a header row and one caption per row",
    ".parquet": "one caption per row",
}


def read_caption_file(path: Path, column: str = "text") -> list[str]:
    """Raw captions of a local file, in file order (cleaning happens later)."""
    if path.is_dir():
        raise CaptionSourceError(
            f"{path}: is a folder, expected a caption file ({', '.join(SUPPORTED_SUFFIXES)})"
        )
    if not path.is_file():
        raise CaptionSourceError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        texts = _lines(path)
    elif suffix in (".csv", ".tsv"):
        texts = _read_delimited(path, column, "," if suffix == ".csv" else "\t")
    elif suffix == ".jsonl":
        texts = _read_jsonl(path, column)
    elif suffix == ".parquet":
        texts = _read_parquet(path, column)
    else:
        raise CaptionSourceError(
            f"{path}: unknown extension {suffix!r} (supported: {', '.join(SUPPORTED_SUFFIXES)})"
        )
    if not texts:
        raise CaptionSourceError(f"{path}: no captions in the file (expected {EMPTY[suffix]})")
    return texts


def read_hub_dataset(name: str, column: str, split: str) -> list[str]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types; all mean "cannot get it"
        raise CaptionSourceError(
            f"captions.source: cannot load the hub dataset {name!r} (split {split!r}): {err}. "
            f"Offline, export the captions to a local .txt/.parquet file and point to it."
        ) from err
    if column not in dataset.column_names:
        raise CaptionSourceError(
            f"captions.source {name!r}: no column {column!r} "
            f"(columns: {', '.join(dataset.column_names)}); set captions.column"
        )
    feature = dataset.features[column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise CaptionSourceError(
            f"captions.source {name!r}: column {column!r} holds {feature}, expected strings; "
            f"set captions.column to the caption column"
        )
    return ["" if v is None else v for v in dataset[column]]
