"""Caption sources, cleaning and the deterministic split."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.captions import (
    CaptionSourceError,
    clean_captions,
    read_caption_file,
    split_train_test,
)
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
        "\n".join(json.dumps({"text": t}) for t in ["cat", "maid"]) + "\n", encoding="utf-8")
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


@pytest.mark.parametrize("name, content, message", [
    ("a.csv", "caption\nx\n", r"a\.csv:1: no column 'text'.*columns: caption"),
    ("a.jsonl", '{"caption": "x"}\n', r"a\.jsonl:1: expected an object with the field 'text'"),
    ("a.jsonl", "{not json\n", r"a\.jsonl:1: not valid JSON"),
    ("a.xml", "<x/>", r"unknown extension '\.xml'"),
    ("a.csv", "", r"a\.csv: empty file"),
])
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
    from pipeline.params import WORLD_PROMPTS_MULTI, WORLD_PROMPTS_SINGLE

    captions = generate_captions(5000, seed=0)
    assert captions == generate_captions(5000, seed=0)
    vocabulary = {w for c in captions for w in c.replace(",", " ").split()}
    grid = {w for p in WORLD_PROMPTS_SINGLE for w in p.split()}
    assert grid <= vocabulary
    # The comma-separated parts of the grid prompts are captions the world writes.
    parts = {part.strip() for p in WORLD_PROMPTS_MULTI for part in p.split(",")}
    assert parts <= set(generate_captions(50_000, seed=1))


@given(st.lists(st.text(alphabet=st.sampled_from(list("ab c,\t\n\u00e9\U0001f431")), max_size=12),
                max_size=30))
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
    from pipeline.captions import run_captions_stage
    from tests.conftest import project_dir, small_params

    source = tmp_path / "captions.txt"
    lines = [f"caption number {i}" for i in range(30)] + ["word " * 200_000, "", "caption number 1"]
    source.write_text("\n".join(lines), encoding="utf-8")
    monkeypatch.chdir(project_dir(tmp_path / "project", base_dir))
    stats = run_captions_stage(small_params(captions={"source": str(source), "train_size": 20,
                                                      "test_size": 5}))
    assert stats["dropped"] == {"duplicate": 1, "empty": 1, "too_long": 1}
    assert stats["kept"] == 30 and stats["train"] == 20 and stats["test"] == 5
