"""Shards: contents match a direct forward, augmentation as docs/architectures.md, mmap'd."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.base.clip_encode import encode_texts
from pipeline.data.extraction import open_image_rows, plan_rows
from pipeline.data.shards import ShardError, ShardReader, load_constants, open_shard
from tests.conftest import run_small_pipeline, small_params


def rows_of(shards):
    return [
        r
        for p in sorted((shards / "train").glob("shard-*.arrow"))
        for r in open_shard(p).to_pylist()
    ]


def test_layout_and_meta(small_shards):
    meta = json.loads((small_shards / "meta.json").read_text())
    assert meta["splits"]["train"]["rows"] == 48 and meta["splits"]["test"]["rows"] == 12
    assert [p.name for p in sorted((small_shards / "train").glob("*"))] == [
        "shard-00000.arrow",
        "shard-00001.arrow",
        "shard-00002.arrow",
    ]  # 20 rows each
    constants = load_constants(small_shards / "constants.safetensors")
    d = meta["hidden_size"]
    assert constants["sos"].shape == (d,) and constants["deprojection"].shape == (d, d)
    train = meta["splits"]["train"]
    kinds, fell_back = train["kinds"], sum(train["augmentations_kept_plain"].values())
    assert sum(kinds.values()) == 48
    assert kinds["split"] + kinds["combine"] + fell_back == round(0.3 * 48) * 2


def test_hidden_rows_equal_a_direct_forward(small_shards, clip):
    rows = rows_of(small_shards)
    sample = rows[:6]
    direct = encode_texts(clip, [r["target_text"] for r in sample])
    stored = torch.tensor(np.array([r["hidden"] for r in sample], dtype=np.float32))
    # float16 storage: relative precision ~1e-3 of the magnitude
    torch.testing.assert_close(stored, direct.hidden, rtol=2e-3, atol=2e-3)
    for row, n in zip(sample, direct.n_tokens, strict=True):
        assert row["n_tokens"] == n and sum(row["mask"]) == n


def test_augmented_rows_follow_the_formula(small_shards, clip):
    null = load_constants(small_shards / "constants.safetensors")["null"]
    rows = rows_of(small_shards)
    for kind in ("split", "combine", "plain"):
        row = next(r for r in rows if r["kind"] == kind)
        pooled = encode_texts(clip, row["parts"]).pooled
        expected = (pooled - null).sum(dim=0) + null
        torch.testing.assert_close(torch.tensor(row["embeds"]), expected, rtol=0, atol=1e-5)
        if kind == "split":
            assert " ".join(row["parts"]) == row["target_text"] and len(row["parts"]) == 2
        if kind == "combine":
            assert row["target_text"] == f"{row['parts'][0]} {row['parts'][1]}"


def test_plan_turns_impossible_augmentations_into_plain_rows():
    captions = ["cat", "maid outfit", "long " * 40, "short " * 40]
    rows, skipped = plan_rows(captions, 0.5, 0.5, 0, lambda ts: [len(t.split()) + 2 for t in ts])
    assert len(rows) == 4
    assert sum(skipped.values()) >= 1
    for row in rows:
        if row.kind == "combine":
            assert len(row.target_text.split()) + 2 <= 77


def test_reader_streams_batches_and_datasets_opens_shards(small_shards):
    import datasets

    reader = ShardReader(small_shards / "train")
    assert len(reader) == 48
    batches = list(reader.iter_batches(10, shuffle=True, seed=1, epoch=0))
    assert [len(b.embeds) for b in batches] == [10, 10, 10, 10, 8]
    assert batches[0].hidden.dtype == torch.float32 and batches[0].hidden.shape[1:] == (77, 128)
    again = list(reader.iter_batches(10, shuffle=True, seed=1, epoch=0))
    assert all(torch.equal(a.hidden, b.hidden) for a, b in zip(batches, again, strict=True))
    other = next(reader.iter_batches(10, shuffle=True, seed=1, epoch=1))
    assert not torch.equal(other.hidden, batches[0].hidden)
    resumed = list(reader.iter_batches(10, shuffle=True, seed=1, epoch=0, start=3))
    assert torch.equal(resumed[0].hidden, batches[3].hidden)
    ds = datasets.Dataset.from_file(str(small_shards / "train" / "shard-00000.arrow"))
    assert len(ds) == 20 and len(ds[0]["hidden"]) == 77
    table = open_shard(small_shards / "train" / "shard-00001.arrow")
    assert isinstance(table, pa.Table) and table.num_rows == 20


def digest(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_params_give_identical_shards_and_resume_rewrites_only_what_is_missing(
    tmp_path, base_dir, small_shards
):
    shards = run_small_pipeline(tmp_path / "again", base_dir)
    assert digest(shards) == digest(small_shards)
    assert digest(shards.parent / "captions") == digest(small_shards.parent / "captions")
    # A lost shard and a corrupt one (as left by a crash of another tool): both are rebuilt,
    # the rest is kept untouched.
    (shards / "train" / "shard-00001.arrow").unlink()
    corrupt = shards / "train" / "shard-00002.arrow"
    corrupt.write_bytes(corrupt.read_bytes()[:1000])
    with pytest.raises(ShardError, match="shard-00002.arrow: not a readable Arrow shard"):
        ShardReader(shards / "train")
    kept = (shards / "train" / "shard-00000.arrow").stat().st_mtime_ns
    run_small_pipeline(tmp_path / "again", base_dir)
    assert digest(shards) == digest(small_shards)
    assert (shards / "train" / "shard-00000.arrow").stat().st_mtime_ns == kept
    assert not list(shards.rglob(".*tmp*"))


def test_changed_params_rebuild_stale_shards(tmp_path, base_dir):
    work = tmp_path / "p"
    run_small_pipeline(work, base_dir)
    shards = run_small_pipeline(
        work, base_dir, small_params(augment={"seed": 5}, extract={"rows_per_shard": 30})
    )
    assert sorted(p.name for p in (shards / "train").glob("*.arrow")) == [
        "shard-00000.arrow",
        "shard-00001.arrow",
    ]
    assert len(ShardReader(shards / "train")) == 48


def test_two_workers_write_exactly_the_single_worker_shards(tmp_path, base_dir, small_shards):
    work = tmp_path / "workers"
    for index in (0, 1):
        shards = run_small_pipeline(
            work, base_dir, small_params(extract={"num_workers": 2, "worker_index": index})
        )
        if index == 0:
            assert sorted(p.name for p in (shards / "train").glob("*.arrow")) == [
                "shard-00000.arrow",
                "shard-00002.arrow",
            ]
    assert digest(shards) == digest(small_shards)


@pytest.mark.slow
def test_a_rebuilt_base_model_of_the_same_name_invalidates_the_shards(tmp_path, base_dir):
    from pipeline.world.build import build_micro_world

    other_base = tmp_path / "other-world"
    build_micro_world(other_base, seed=1)
    work = tmp_path / "p"
    first = digest(run_small_pipeline(work, base_dir))
    (work / "models" / "world").unlink()  # same name `builtin`, other weights
    assert (
        digest(run_small_pipeline(work, other_base))["train/shard-00000.arrow"]
        != first["train/shard-00000.arrow"]
    )


def stream_schema_length(path) -> int:
    """Bytes of an Arrow IPC stream up to the end of its schema message (816 for the issue's
    test shard): what a copy cut right after the schema keeps."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, open_shard(path).schema):
        pass
    return len(sink.getvalue()) - 8  # less the end-of-stream marker


def test_a_shard_cut_after_its_schema_is_refused_and_rebuilt(
    tmp_path, base_dir, small_shards, capsys
):
    import shutil

    work = tmp_path / "cut"
    shutil.copytree(small_shards.parent, work / "data")
    shards = work / "data" / "shards"
    cut = shards / "test" / "shard-00000.arrow"
    cut.write_bytes(cut.read_bytes()[: stream_schema_length(cut)])
    # A valid stream of 0 rows: the row count its metadata promises tells it from a complete one.
    with pytest.raises(
        ShardError,
        match=r"test/shard-00000\.arrow: incomplete shard: 0 rows, "
        r"its metadata promises 12",
    ):
        ShardReader(shards / "test")
    capsys.readouterr()
    run_small_pipeline(work, base_dir)
    assert "test: 1 shards written, 0 complete shards kept" in capsys.readouterr().err
    assert digest(shards) == digest(small_shards)
    assert len(ShardReader(shards / "test")) == 12


def test_the_reader_refuses_a_split_short_of_what_meta_json_promises(tmp_path, small_shards):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    (shards / "train" / "shard-00001.arrow").unlink()
    with pytest.raises(
        ShardError,
        match=r"train: 28 rows in 2 shards, but .*meta\.json promises "
        r"48 rows in 3 shards; missing shard-00001\.arrow",
    ):
        ShardReader(shards / "train")


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "meta.json",
            '{"base_clip": "builtin", "hidden',
            r"meta\.json:1: not valid JSON .*incomplete or corrupt",
        ),
        (
            "meta.json",
            '{"base_clip": "builtin"}',
            r"meta\.json: missing keys hidden_size, "
            r"projection_size, splits",
        ),
        ("meta.json", "[]", r"meta\.json: expected a JSON object, found a list"),
        (
            "constants.safetensors",
            b"\x10\x00",
            r"constants\.safetensors: incomplete or corrupt "
            r"safetensors file \(.*header too small",
        ),
    ],
)
def test_corrupt_meta_and_constants_name_the_file(tmp_path, small_shards, name, content, message):
    import shutil

    from pipeline.data.shards import read_meta

    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    path = shards / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ShardError, match=message):
        read_meta(shards) if name == "meta.json" else load_constants(path)


def test_truncated_constants_name_the_file(tmp_path, small_shards):
    path = tmp_path / "constants.safetensors"
    data = (small_shards / "constants.safetensors").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ShardError,
        match=r"constants\.safetensors: incomplete or corrupt "
        r"safetensors file.*rerun `deprojector extract`",
    ):
        load_constants(path)


def test_a_killed_runs_temporary_shard_file_is_removed_on_resume(tmp_path, base_dir):
    """SIGKILL while a shard is written leaves `.shard-NNNNN.arrow.tmp-PID`; the next run of
    the worker that owns that shard removes it (another worker's leftovers are its own)."""
    work = tmp_path / "work"
    shards = run_small_pipeline(work, base_dir)
    leftover = shards / "train" / ".shard-00001.arrow.tmp-99999"
    leftover.write_bytes(b"half a shard")
    other = shards / "train" / ".shard-00001.arrow.tmp-12345"
    other.write_bytes(b"another half")
    before = sorted(p.name for p in (shards / "train").iterdir())
    run_small_pipeline(work, base_dir, small_params(extract={"num_workers": 2, "worker_index": 0}))
    assert other.exists() and leftover.exists()  # shard 1 belongs to worker 1 of 2
    run_small_pipeline(work, base_dir)
    assert not leftover.exists() and not other.exists()
    assert sorted(p.name for p in (shards / "train").iterdir()) == [
        name for name in before if ".tmp-" not in name
    ]


def test_image_rows_take_plain_slots_in_training_and_are_added_to_test():
    captions = [f"caption {i} words" for i in range(20)]
    count = lambda ts: [len(t.split()) + 2 for t in ts]  # noqa: E731
    plain, _ = plan_rows(captions, 0.3, 0.2, 0, count)
    pairs = [(f"pair {k}", f"a picture {k}") for k in range(5)]
    mixed, _ = plan_rows(captions, 0.3, 0.2, 0, count, pairs)
    assert len(mixed) == 20 and [r.target_text for r in mixed if r.kind == "image"] == [
        caption for _, caption in pairs
    ]
    for before, after in zip(plain, mixed, strict=True):  # only plain rows became images
        assert after == before or (before.kind == "plain" and after.kind == "image")
    added, _ = plan_rows(captions, 0.3, 0.2, 0, count, pairs, add_pairs=True)
    assert added[:20] == plain and [r.parts[0] for r in added[20:]] == [p for p, _ in pairs]
    with pytest.raises(ValueError, match="16 image rows do not fit among 20 rows"):
        plan_rows(captions, 0.3, 0.2, 0, count, pairs * 3 + [("x", "y")])


def test_image_rows_hold_the_bridged_scene_and_its_captions_states(tmp_path, base_dir, clip):
    from pipeline.base.vision import ImageTower
    from pipeline.data.pairs import WorldPairs
    from pipeline.prompting.bridges import ModalityGap
    from pipeline.stages.gap import run_gap_stage

    params = small_params(augment={"image": 0.25}, gap={"pairs": 32, "bridge": "linear"})
    shards = run_small_pipeline(
        tmp_path,
        base_dir,
        params,
        before_extract=lambda: run_gap_stage(params, tmp_path / "data" / "gap"),
    )
    meta = json.loads((shards / "meta.json").read_text())
    train, test = meta["splits"]["train"], meta["splits"]["test"]
    assert train["rows"] == 48 and train["kinds"]["image"] == 12
    assert test["rows"] == 12 + 3 and test["kinds"]["image"] == 3
    reader = ShardReader(shards / "test")
    assert list(reader.rows_of(image=True)) == [12, 13, 14]  # after the caption rows
    rows = [r for r in rows_of(shards) if r["kind"] == "image"]
    seed = int(rows[0]["parts"][0].rsplit(" ", 1)[1])
    pairs = WorldPairs(12, seed)  # the training pairs: world scenes of their own seed
    tower = ImageTower.load("builtin", base_dir=base_dir)
    gap = ModalityGap.load(tmp_path / "data" / "gap")
    deprojection = load_constants(shards / "constants.safetensors")["deprojection"]
    for row in rows[:3]:
        k = pairs.ids.index(row["parts"][0])
        assert row["target_text"] == pairs.captions[k]
        expected = gap.correct(tower.embed([pairs.image(k)]), "linear") @ deprojection.T
        # The shard embeds its images in one batch: float32 batching noise only.
        torch.testing.assert_close(torch.tensor([row["embeds"]]), expected, rtol=1e-3, atol=1e-3)
        stored = torch.tensor(np.array(row["hidden"], dtype=np.float32))
        torch.testing.assert_close(
            stored, encode_texts(clip, [row["target_text"]]).hidden[0], rtol=2e-3, atol=2e-3
        )


# A CPU without AVX-512 or AVX2 as far as PyTorch, MKL and oneDNN can tell: their fallback
# kernels sum in other orders, as another machine's do.
OTHER_CPU = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
    "DNNL_MAX_CPU_ISA": "SSE41",
}
EXTRACT_SCRIPT = """
import sys
from pathlib import Path
from tests.conftest import run_small_pipeline, small_params
run_small_pipeline(Path(sys.argv[1]), Path(sys.argv[2]),
                   small_params(extract={"compute_dtype": sys.argv[3]}))
"""


@pytest.mark.slow
def test_shards_are_the_same_bytes_on_another_cpu(tmp_path, base_dir):
    """extract.compute_dtype float64: the shards (text and image rows) do not depend on the
    CPU's kernels, so a fresh clone elsewhere keeps every committed model and result; float32
    shards do (when they do not, this CPU's kernels are the fallback's: nothing to compare)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def shards(compute_dtype: str, env: dict[str, str]) -> dict[str, str]:
        work = tmp_path / f"{compute_dtype}-{bool(env)}"
        subprocess.run(
            [sys.executable, "-c", EXTRACT_SCRIPT, str(work), str(base_dir), compute_dtype],
            check=True,
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root), **env},
            capture_output=True,
        )
        files = sorted((work / "data" / "shards").glob("*/*.arrow"))
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}

    if shards("float32", {}) == shards("float32", OTHER_CPU):
        pytest.skip("this CPU computes float32 as the fallback kernels do")
    native = shards("float64", {})
    assert len(native) > 1
    assert shards("float64", OTHER_CPU) == native


def test_image_rows_without_paired_data_are_skipped_with_one_reason(tmp_path) -> None:
    """A real CLIP and an empty gap.source (this repository's data/gap-pairs/ holds only a
    README): no image rows and why, instead of an error after the CLIP is loaded; with
    augment.image 0 nothing is said."""
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "README.md").write_text("pairs go here\n")
    params = small_params(
        base={"clip": "some/clip", "sd": "some/sd"},
        augment={"image": 0.3},
        gap={"source": str(tmp_path / "pairs")},
    )
    images, why = open_image_rows(params, tmp_path / "gap", torch.zeros(4, 4))
    assert images is None
    assert why.startswith("augment.image = 0.3, but gap.source")
    assert "no image rows, caption rows only" in why and "augment.image: 0" in why
    none = small_params(base={"clip": "some/clip", "sd": "some/sd"}, augment={"image": 0.0})
    assert open_image_rows(none, tmp_path / "gap", torch.zeros(4, 4)) == (None, None)
