"""Caption sources, cleaning and the deterministic split."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.data.caption_files import CaptionSourceError, read_caption_file
from pipeline.data.captions import clean_captions, split_train_test
from pipeline.world.scenes import generate_captions


def words(texts):
    return [len(t.split()) + 2 for t in texts]


def test_cleaning_counts_each_reason():
    raw = ["cat maid", "  cat   maid ", "", "   ", "\t", "word " * 80, "1girl\nred hair"]
    result = clean_captions(raw, words, max_tokens=77)
    assert result.captions == ["cat maid", "1girl red hair"]
    assert result.dropped == {"duplicate": 1, "empty": 3, "too_long": 1}


def test_clean_keeps_a_caption_exactly_at_the_limit():
    at_limit = " ".join(["w"] * 75)  # 75 tokens + BOS + EOS = 77
    result = clean_captions([at_limit, at_limit + " w"], words, max_tokens=77)
    assert result.captions == [at_limit]
    assert result.dropped == {"too_long": 1}


def test_readers_for_every_supported_format(tmp_path):
    (tmp_path / "a.txt").write_text("cat maid\n\n1girl red hair\n", encoding="utf-8")
    (tmp_path / "a.csv").write_text('text,score\n"cat, maid",1\n1boy,2\n', encoding="utf-8")
    (tmp_path / "a.tsv").write_text("id\tprompt\n1\tcat maid\n", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"text": t}) for t in ["cat", "maid"]) + "\n", encoding="utf-8"
    )
    pq.write_table(pa.table({"text": ["x y", None]}), tmp_path / "a.parquet")
    assert read_caption_file(tmp_path / "a.txt") == ["cat maid", "", "1girl red hair"]
    assert read_caption_file(tmp_path / "a.csv") == ["cat, maid", "1boy"]
    assert read_caption_file(tmp_path / "a.tsv", column="prompt") == ["cat maid"]
    assert read_caption_file(tmp_path / "a.jsonl") == ["cat", "maid"]
    assert read_caption_file(tmp_path / "a.parquet") == ["x y", ""]


def test_non_utf8_file_names_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\nalso fine\nbad \xff byte\n")
    with pytest.raises(CaptionSourceError, match=r"bad\.txt:3: not valid UTF-8"):
        read_caption_file(path)


def test_nul_byte_names_the_line(tmp_path):
    path = tmp_path / "nul.txt"
    path.write_bytes(b"fine\nnul\x00here\n")
    with pytest.raises(CaptionSourceError, match=r"nul\.txt:2: contains a NUL byte"):
        read_caption_file(path)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.csv", "caption\nx\n", r"a\.csv:1: no column 'text'.*columns: caption"),
        ("a.jsonl", '{"caption": "x"}\n', r"a\.jsonl:1: expected an object with the field 'text'"),
        ("a.jsonl", "{not json\n", r"a\.jsonl:1: not valid JSON"),
        ("a.xml", "<x/>", r"unknown extension '\.xml'"),
        ("a.csv", "", r"a\.csv: empty file"),
    ],
)
def test_bad_files_get_specific_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CaptionSourceError, match=message):
        read_caption_file(path)


def test_split_is_deterministic_and_disjoint():
    captions = [f"caption {i}" for i in range(100)]
    train, test = split_train_test(captions, train_size=70, test_size=20, seed=3)
    assert (train, test) == split_train_test(captions, 70, 20, seed=3)
    assert len(train) == 70 and len(test) == 20 and not set(train) & set(test)
    assert split_train_test(captions, 70, 20, seed=4) != (train, test)
    with pytest.raises(CaptionSourceError, match="leaves none for training"):
        split_train_test(captions[:5], 10, 5, seed=0)


def test_builtin_generator_is_deterministic_and_covers_the_grid_prompts():
    from pipeline.config.params import WORLD_PROMPTS_MULTI, WORLD_PROMPTS_SINGLE

    captions = generate_captions(5000, seed=0)
    assert captions == generate_captions(5000, seed=0)
    vocabulary = {w for c in captions for w in c.replace(",", " ").split()}
    grid = {w for p in WORLD_PROMPTS_SINGLE for w in p.split()}
    assert grid <= vocabulary
    # The comma-separated parts of the grid prompts are captions the world writes.
    parts = {part.strip() for p in WORLD_PROMPTS_MULTI for part in p.split(",")}
    assert parts <= set(generate_captions(50_000, seed=1))


@given(
    st.lists(
        st.text(alphabet=st.sampled_from(list("ab c,\t\n\u00e9\U0001f431")), max_size=12),
        max_size=30,
    )
)
def test_cleaning_properties(raw):
    result = clean_captions(raw, words, max_tokens=6)
    kept = result.captions
    assert len(kept) == len(set(kept))  # no duplicates
    assert all(c and c == " ".join(c.split()) for c in kept)  # normalised, non-empty
    assert all(len(c.split()) + 2 <= 6 for c in kept)
    assert len(kept) + sum(result.dropped.values()) == len(raw)  # every caption accounted for
    # Nothing that passes the rules is lost, and order is kept.
    expected = list(dict.fromkeys(n for n in (" ".join(r.split()) for r in raw) if n))
    assert kept == [c for c in expected if len(c.split()) + 2 <= 6]


def test_captions_stage_drops_a_one_megabyte_line_and_counts_it(tmp_path, base_dir, monkeypatch):
    from pipeline.stages.captions import run_captions_stage
    from tests.conftest import project_dir, small_params

    source = tmp_path / "captions.txt"
    lines = [f"caption number {i}" for i in range(30)] + ["word " * 200_000, "", "caption number 1"]
    source.write_text("\n".join(lines), encoding="utf-8")
    monkeypatch.chdir(project_dir(tmp_path / "project", base_dir))
    stats = run_captions_stage(
        small_params(captions={"source": str(source), "train_size": 20, "test_size": 5})
    )
    assert stats["dropped"] == {"duplicate": 1, "empty": 1, "too_long": 1}
    assert stats["kept"] == 30 and stats["train"] == 20 and stats["test"] == 5


# --- bad input of every kind: the right result, or an error naming file, line and column ----


def test_a_csv_caption_over_the_csv_modules_field_limit_is_dropped_as_too_long(
    tmp_path, base_dir, monkeypatch
):
    """The csv module stops at 131,072 characters a field; the cleaning drops and counts."""
    from pipeline.stages.captions import run_captions_stage
    from tests.conftest import project_dir, small_params

    source = tmp_path / "captions.csv"
    rows = [f"caption number {i}" for i in range(30)] + ["w" * 220_000]
    source.write_text("text\n" + "\n".join(rows) + "\n", encoding="utf-8")
    assert read_caption_file(source)[-1] == "w" * 220_000
    monkeypatch.chdir(project_dir(tmp_path / "project", base_dir))
    stats = run_captions_stage(
        small_params(captions={"source": str(source), "train_size": 20, "test_size": 5})
    )
    assert stats["read"] == 31 and stats["dropped"] == {"too_long": 1}
    on_disk = json.loads((tmp_path / "project" / "data" / "captions" / "stats.json").read_text())
    assert on_disk["dropped"] == {"too_long": 1}


SEPARATORS = ["\u2028", "\u2029", "\u0085", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c"]


@pytest.mark.parametrize("separator", SEPARATORS, ids=[hex(ord(c)) for c in SEPARATORS])
def test_unicode_line_separators_stay_inside_a_caption(tmp_path, separator):
    """Records end at "\\n" only (JSON Lines, CSV, text): str.splitlines would cut here."""
    caption = f"red{separator}circle"
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": caption}, ensure_ascii=False) + "\n" + '{"text": "blue"}\n',
        encoding="utf-8",
    )
    (tmp_path / "a.csv").write_text(f"text,n\n{caption},1\nblue,2\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text(f"{caption}\nblue\n", encoding="utf-8")
    for name in ("a.jsonl", "a.csv", "a.txt"):
        assert read_caption_file(tmp_path / name) == [caption, "blue"], name
    # The cleaning makes the separator a space, like any other whitespace.
    assert clean_captions([caption], words).captions == ["red circle"]


def test_windows_line_ends_are_line_ends(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"cat\r\nmaid\r\n")
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "cat"}\r\n{"text": "maid"}\r\n')
    (tmp_path / "a.csv").write_bytes(b"text\r\ncat\r\nmaid\r\n")
    for name in ("a.txt", "a.jsonl", "a.csv"):
        assert read_caption_file(tmp_path / name) == ["cat", "maid"], name


def test_quotes_in_a_tsv_are_ordinary_characters(tmp_path):
    """A caption starting with '"' swallowed the next rows (6 captions became 2)."""
    captions = ['"dog in a coat', "cat", 'a 5" screen', '"quoted"', "bird", "fish"]
    path = tmp_path / "a.tsv"
    path.write_text(
        "id\ttext\n" + "".join(f"{i}\t{c}\n" for i, c in enumerate(captions)), encoding="utf-8"
    )
    assert read_caption_file(path) == captions
    path.write_text("id\ttext\n1\tcat\tmaid\n", encoding="utf-8")
    with pytest.raises(
        CaptionSourceError,
        match=r"a\.tsv:2: 3 fields, the header has 2 "
        r"\(id, text\); a tab inside a caption",
    ):
        read_caption_file(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (
            'text,n\ncat,1\n"dog,2\nbird,3\nfish,4\n',
            r"a\.csv:3: a quoted field that starts in this record is never closed: lines 3-5 \(the "
            r"rest of the file\) would be one caption",
        ),
        ('text,n\ncat,1\n"dog" big,2\nbird,3\n', r"a\.csv:3: malformed quoting \(',' expected"),
        (
            "text\ncat, maid\n",
            r"a\.csv:2: 2 fields, the header has 1 \(text\); a ',' in a caption "
            r"that is not quoted\? quote the field",
        ),
        ("text,n\ncat,1\nmaid\n", r"a\.csv:3: 1 fields, the header has 2"),
        ("text,n\n", r"a\.csv: no captions in the file \(expected a header row and one caption"),
    ],
)
def test_csv_rows_are_never_silently_merged_or_cut(tmp_path, content, message):
    path = tmp_path / "a.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CaptionSourceError, match=message):
        read_caption_file(path)


def test_a_quoted_csv_caption_may_span_lines_and_hold_quotes(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('text,n\n"cat\nmaid",1\n"a ""quoted"" dog",2\n', encoding="utf-8")
    assert read_caption_file(path) == ["cat\nmaid", 'a "quoted" dog']


@pytest.mark.parametrize(
    "value, found",
    [
        (3, r"a number \(3\)"),
        (2.5, r"a number \(2\.5\)"),
        (["a", "b"], r'an array \(\["a", "b"\]\)'),
        (True, r"a boolean \(true\)"),
        ({"k": 1}, r'an object \(\{"k": 1\}\)'),
    ],
)
def test_a_jsonl_caption_that_is_not_a_string_names_line_field_and_type(tmp_path, value, found):
    path = tmp_path / "a.jsonl"
    path.write_text(
        json.dumps({"text": "ok"}) + "\n" + json.dumps({"id": 2, "text": value}) + "\n",
        encoding="utf-8",
    )
    with pytest.raises(
        CaptionSourceError,
        match=rf"a\.jsonl:2: field 'text' is {found}, "
        r"expected a string",
    ):
        read_caption_file(path)


def test_null_captions_are_empty_and_counted_as_such(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "cat"}\n{"text": null}\n', encoding="utf-8")
    pq.write_table(
        pa.table({"text": pa.array(["cat", None], pa.large_string())}), tmp_path / "a.parquet"
    )
    for name in ("a.jsonl", "a.parquet"):
        raw = read_caption_file(tmp_path / name)
        assert raw == ["cat", ""], name
        assert clean_captions(raw, words).dropped == {"empty": 1}


@pytest.mark.parametrize(
    "column, message",
    [
        (pa.array([1, 2]), r"a\.parquet: column 'text' has the Arrow type int64, expected strings"),
        (pa.array([["a"], ["b"]]), r"column 'text' has the Arrow type list<element: string>"),
        (pa.array([True, None]), r"column 'text' has the Arrow type bool"),
    ],
)
def test_a_parquet_column_that_is_not_text_names_its_type(tmp_path, column, message):
    pq.write_table(pa.table({"text": column}), tmp_path / "a.parquet")
    with pytest.raises(CaptionSourceError, match=message):
        read_caption_file(tmp_path / "a.parquet")


def test_parquet_text_columns_of_every_string_type_are_read(tmp_path):
    pq.write_table(
        pa.table({"text": pa.array(["a", "b", "a"]).dictionary_encode()}), tmp_path / "a.parquet"
    )
    assert read_caption_file(tmp_path / "a.parquet") == ["a", "b", "a"]
    pq.write_table(pa.table({"caption": ["a"]}), tmp_path / "b.parquet")
    with pytest.raises(
        CaptionSourceError,
        match=r"b\.parquet: no column 'text' \(columns: "
        r"caption\)",
    ):
        read_caption_file(tmp_path / "b.parquet")


def test_a_hub_column_that_is_not_text_names_its_type(monkeypatch):
    import datasets

    from pipeline.data.caption_files import read_hub_dataset

    table = datasets.Dataset.from_dict({"text": [1, 2], "caption": ["a", None]})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: table)
    with pytest.raises(
        CaptionSourceError,
        match=r"captions\.source 'me/data': column 'text' "
        r"holds .*int64.*, expected strings",
    ):
        read_hub_dataset("me/data", "text", "train")
    assert read_hub_dataset("me/data", "caption", "train") == ["a", ""]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.txt", b"", r"a\.txt: no captions in the file \(expected one caption per line\)"),
        ("a.jsonl", b"", r"a\.jsonl: no captions in the file"),
        (
            "a.txt",
            b"ok\nnul\x00here\n",
            r"a\.txt:2: contains a NUL byte \(byte 4 of the line, "
            r"offset 6 in the file\)",
        ),
        (
            "a.csv",
            b"text\nok\nbad \xff\n",
            r"a\.csv:3: not valid UTF-8 \(byte 5 of the line, "
            r"offset 12 in the file: b'\\xff'\)",
        ),
        ("a.jsonl", b'{"text": "caf\xe9"}\n', r"a\.jsonl:1: not valid UTF-8 \(byte 14 of the line"),
    ],
)
def test_empty_and_undecodable_files_name_line_and_byte(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CaptionSourceError, match=message):
        read_caption_file(path)


def test_a_folder_given_as_the_caption_file_is_named(tmp_path):
    from pipeline.data.captions import collect_raw

    (tmp_path / "captions.txt").mkdir()
    with pytest.raises(
        CaptionSourceError,
        match=r"captions\.txt: is a folder, expected a "
        r"caption file",
    ):
        collect_raw(str(tmp_path / "captions.txt"), "text", "train", 10, 0)
