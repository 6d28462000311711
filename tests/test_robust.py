"""Faults as users and operators meet them (issue 32), one test per kind: untrusted files are
read as data, special files are refused by kind, outputs are replaced atomically, refused
writes end in one line, training that diverges stops, resources stay bounded, numbers are
checked where they enter, and experiments that cannot succeed fail before any output goes."""

from __future__ import annotations

import ast
import builtins
import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import typer
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from pipeline.base.files import BaseModelError, check_clip_folder
from pipeline.base.loaders import load_clip, load_or_explain, load_sd_pipeline
from pipeline.cli import app
from pipeline.config.params import ParamsError
from pipeline.core import atomic
from pipeline.core.atomic import OutputError, save_image, save_tensors, save_torch, write_text
from pipeline.core.errors import DeprojectorError, UnsafeFileError, read_json, read_torch
from pipeline.core.jsonio import write_json
from pipeline.data.caption_files import CaptionSourceError
from pipeline.data.captions import clean_captions, read_split
from pipeline.data.pairs import FolderPairs
from pipeline.data.shards import ShardError, ShardReader, load_constants
from pipeline.models import build_deprojector, load_deprojector
from pipeline.models.base import ModelFileError
from pipeline.prompting.bridges import ModalityGap
from pipeline.prompting.encoder import PromptEncoder
from pipeline.prompting.images import read_image
from pipeline.training.loop import GapOutputError, TrainingDiverged, copy_gap, train_model
from pipeline.world import loop
from tests.conftest import project_dir, small_params

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"epochs": 2, "batch_size": 16, "patience": 0, "seed": 0}
MODELS = {"vicinity-batch": {"type": "vicinity-batch", "norm": "layer"}}


@pytest.fixture
def project(tmp_path, base_dir, small_shards, monkeypatch):
    """A project folder holding the small shards, as cwd."""
    work = project_dir(tmp_path / "project", base_dir)
    shutil.copytree(small_shards.parent, work / "data")
    monkeypatch.chdir(work)
    return work


@contextmanager
def deadline(seconds: int):
    """Turn a read that would block (a FIFO) into a failure instead of a hung test."""

    def fail(*_):
        raise AssertionError(f"still reading after {seconds} s: the file was not refused")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- 1, 2: nothing a user loads runs code -----------------------------------------------------


class Payload:
    """Unpickling this creates the marker file: harmless proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def plant(path: Path, marker: Path, extra: dict | None = None) -> Path:
    """A torch.save file at `path` whose unpickling would run the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**(extra or {}), "payload": Payload(marker)}, path)
    return path


def tiny_model(clip, small_shards):
    constants = load_file(str(small_shards / "constants.safetensors"))
    return build_deprojector(
        "vicinity-batch", clip.hidden_size, clip.projection_size, constants, norm="layer"
    )


def test_a_planted_pickle_runs_nowhere_the_project_reads(
    tmp_path, project, base_dir, clip, small_shards
) -> None:
    marker = tmp_path / "MARKER"
    places = {}

    # training checkpoints: data/checkpoints/NAME.pt, read when a run resumes
    plant(project / "data" / "checkpoints" / "vicinity-batch.pt", marker)
    with pytest.raises(
        UnsafeFileError,
        match=r"vicinity-batch\.pt: holds Python objects "
        r"only pickle could load",
    ):
        train_model("vicinity-batch", small_params(train=TRAIN, models=MODELS))
    places["data/checkpoints/NAME.pt"] = True

    # the world's part checkpoints (data/world-work/judge-<fp>.pt and the others)
    judge = plant(
        tmp_path / "world-work" / "judge-0123.pt",
        marker,
        {"modules": {}, "optimizer": {}, "step": 1, "losses": []},
    )
    with pytest.raises(UnsafeFileError, match=r"judge-0123\.pt"):
        loop.train_steps(
            "judge",
            {},
            torch.optim.Adam([torch.zeros(1, requires_grad=True)]),
            2,
            1e-3,
            lambda step: torch.zeros((), requires_grad=True),
            judge,
        )
    places["data/world-work/PART-<fp>.pt"] = True

    # a deprojector folder: pickle in place of model.safetensors, and a pytorch_model.bin
    model_dir = tmp_path / "models" / "vb"
    tiny_model(clip, small_shards).save_pretrained(model_dir)
    plant(model_dir / "model.safetensors", marker)
    plant(model_dir / "pytorch_model.bin", marker)
    with pytest.raises(ModelFileError, match=r"model\.safetensors: incomplete or corrupt"):
        load_deprojector(model_dir)
    places["models/NAME/"] = True

    # the base CLIP folder: weights only as a pickled pytorch_model.bin
    clip_dir = tmp_path / "clip"
    shutil.copytree(base_dir / "clip", clip_dir)
    tensors = load_file(str(clip_dir / "model.safetensors"))
    (clip_dir / "model.safetensors").unlink()
    plant(clip_dir / "pytorch_model.bin", marker, tensors)
    with pytest.raises(UnsafeFileError, match=r"pytorch_model\.bin: holds Python objects"):
        load_clip(str(clip_dir))
    places["base.clip folder"] = True

    # the base SD folder: text_encoder/pytorch_model.bin (row 2: one line, not a traceback)
    sd_dir = tmp_path / "sd"
    shutil.copytree(base_dir / "sd", sd_dir)
    tensors = load_file(str(sd_dir / "text_encoder" / "model.safetensors"))
    (sd_dir / "text_encoder" / "model.safetensors").unlink()
    plant(sd_dir / "text_encoder" / "pytorch_model.bin", marker, tensors)
    with pytest.raises(DeprojectorError, match=r"text_encoder/pytorch_model\.bin: holds "):
        load_sd_pipeline(str(sd_dir))
    places["base.sd folder"] = True

    # caches the stages hand on: gap statistics, the shards' constants, a saved model's gap
    for path, reader in (
        (tmp_path / "gap" / "modality_gap.safetensors", ModalityGap.load),
        (tmp_path / "shards" / "constants.safetensors", load_constants),
    ):
        plant(path, marker)
        with pytest.raises(DeprojectorError, match=path.name):
            reader(path)
    places["data/gap, data/shards/constants.safetensors"] = True

    # any torch file read through the one reader
    with pytest.raises(UnsafeFileError):
        read_torch(plant(tmp_path / "any.pt", marker))
    assert not marker.exists(), "a planted pickle ran"
    assert len(places) == 6


def test_the_cli_says_one_line_for_a_pickled_base_folder(tmp_path, base_dir) -> None:
    sd_dir = tmp_path / "sd"
    shutil.copytree(base_dir / "sd", sd_dir)
    tensors = load_file(str(sd_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    (sd_dir / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    plant(sd_dir / "unet" / "diffusion_pytorch_model.bin", tmp_path / "M", tensors)
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"base": {"clip": str(base_dir / "clip"), "sd": str(sd_dir)}})
    )
    result = CliRunner().invoke(
        app,
        ["base", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "base.json")],
    )
    assert result.exit_code == 2, result.output
    assert "diffusion_pytorch_model.bin: holds Python objects" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "M").exists()


# --- 3: special files are refused by kind, before reading ------------------------------------


def test_fifos_and_device_links_are_refused_without_reading(tmp_path, base_dir) -> None:
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    with deadline(20):
        for path, kind in ((fifo, "a FIFO"), (zero, "a character device")):
            with pytest.raises(DeprojectorError, match=f"is {kind}.*, not a regular file"):
                read_json(path)
            with pytest.raises(DeprojectorError, match=f"is {kind}"):
                read_image(path)
        # the base CLIP's tokenizer.json
        for make in (os.mkfifo, lambda p: p.symlink_to("/dev/zero")):
            clip_dir = tmp_path / f"clip-{id(make)}"
            shutil.copytree(base_dir / "clip", clip_dir)
            (clip_dir / "tokenizer.json").unlink()
            make(clip_dir / "tokenizer.json")
            with pytest.raises(BaseModelError, match=r"tokenizer\.json: is a"):
                check_clip_folder(clip_dir, str(clip_dir))
        # a pairs image (gap.source): hashed only once it is known to be a regular file
        pairs = tmp_path / "pairs"
        pairs.mkdir()
        Image.new("RGB", (8, 8)).save(pairs / "a.png")
        (pairs / "a.txt").write_text("red circle")
        (pairs / "b.txt").write_text("blue square")
        (pairs / "b.png").symlink_to("/dev/zero")
        with pytest.raises(DeprojectorError, match=r"b\.png: is a character device"):
            FolderPairs(pairs)
        (pairs / "b.png").unlink()
        os.mkfifo(pairs / "b.png")
        with pytest.raises(DeprojectorError, match=r"b\.png: is a FIFO"):
            FolderPairs(pairs)


# --- 4: advice that prints a command quotes what the user gave -------------------------------


def test_offline_advice_quotes_the_hub_id(monkeypatch) -> None:
    monkeypatch.setattr("pipeline.base.loaders._hub_reachable", lambda: False)
    hub_id = "openai/clip$(touch M)"

    def load(source, **kwargs):
        raise OSError("not in the cache")

    with pytest.raises(BaseModelError) as caught:
        load_or_explain(load, hub_id, "clip")
    command = str(caught.value).split("`")[1]
    assert shlex.split(command)[:3] == ["hf", "download", hub_id]  # one word, nothing runs


# --- 5-8: outputs replaced atomically; refused writes are one line --------------------------

WRITERS = {
    "text": (lambda p: write_text(p, "new\n"), "grid.json"),
    "json": (lambda p: write_json(p, {"computed": True}), "stats.json"),
    "image": (lambda p: save_image(Image.new("RGB", (4, 4)), p), "grid_single.png"),
    "tensors": (lambda p: save_tensors(p, {"a": torch.zeros(2)}), "cond.safetensors"),
    "torch": (lambda p: save_torch(p, {"a": torch.zeros(2)}), "NAME.pt"),
}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
@pytest.mark.parametrize("writer", WRITERS)
def test_a_refused_write_leaves_the_old_file_and_no_temporary(
    tmp_path, monkeypatch, writer, code
) -> None:
    write, name = WRITERS[writer]
    out = tmp_path / "out" / name
    out.parent.mkdir()
    out.write_bytes(b"old")

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OutputError) as caught:
        write(out)
    message = str(caught.value)
    assert str(out) in message and os.strerror(code) in message and "\n" not in message
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in out.parent.iterdir()) == [name]


def test_a_missing_output_folder_is_made_and_an_unwritable_one_named(tmp_path, monkeypatch) -> None:
    write_text(tmp_path / "a" / "b" / "c.json", "{}")
    assert (tmp_path / "a" / "b" / "c.json").read_text() == "{}"

    def refuse(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(OutputError, match=r"d: cannot write it \(Read-only file system\)"):
        save_image(Image.new("RGB", (4, 4)), tmp_path / "d" / "x.png")


def test_a_writer_killed_mid_write_leaves_the_old_file(tmp_path) -> None:
    """SIGKILL runs no cleanup: the target keeps its old content, and the next write removes
    the dead writer's hidden temporary file."""
    out = tmp_path / "grid_single.png"
    save_image(Image.new("RGB", (8, 8), "red"), out)
    old = out.read_bytes()
    script = (
        f"import os, signal\nfrom pipeline.core.atomic import atomic_path\n"
        f"with atomic_path({str(out)!r}) as tmp:\n"
        f"    tmp.write_bytes(b'half a picture')\n"
        f"    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == -signal.SIGKILL
    assert out.read_bytes() == old
    assert len(list(tmp_path.glob(".grid_single.png.tmp-*"))) == 1
    save_image(Image.new("RGB", (8, 8), "blue"), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid_single.png"]


def test_every_output_is_written_through_the_atomic_writers() -> None:
    """No module writes a file in place: write_text/write_bytes only on an atomic_path
    temporary, no safetensors save_file, torch.save only into a memory buffer, and no
    picture saved outside pipeline/core/atomic.py."""
    found = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative in ("pipeline/core/atomic.py",) or relative.startswith("pipeline/benchmarks/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = (
                func.value.id
                if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                else ""
            )
            if (
                name in ("write_text", "write_bytes")
                and isinstance(func, ast.Attribute)
                and owner != "tmp"
            ):
                found.append(f"{relative}:{node.lineno} {owner}.{name}")
            elif name == "save_file":
                found.append(f"{relative}:{node.lineno} save_file")
            elif (
                name == "save"
                and owner == "torch"
                and not (len(node.args) > 1 and getattr(node.args[1], "id", "") == "buffer")
            ):
                found.append(f"{relative}:{node.lineno} torch.save")
            elif name == "save" and owner not in ("torch", "gap", "self"):
                found.append(f"{relative}:{node.lineno} {owner}.save")
    assert not found, found


def test_a_killed_gap_stage_leaves_no_summary_vouching_for_its_statistics(
    project, monkeypatch
) -> None:
    from pipeline.stages.gap import run_gap_stage

    params = small_params(gap={"pairs": 20, "bank": 16})
    out = project / "data" / "gap"
    assert run_gap_stage(params, out)["computed"]

    def killed(self, path):
        raise KeyboardInterrupt  # as a kill between the deletion and the new statistics

    monkeypatch.setattr(ModalityGap, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        run_gap_stage(params, out)
    assert not (out / "modality_gap.json").exists()
    assert not (out / "modality_gap.safetensors").exists()
    # a summary that says computed without its statistics (an older layout's kill) is refused
    (out / "modality_gap.json").write_text(json.dumps({"computed": True}))
    with pytest.raises(GapOutputError, match=r"incomplete outputs of the gap stage"):
        copy_gap(project / "models" / "x", out)


def cli(project: Path, *args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_encode_generate_and_captions_say_one_line_when_the_disk_refuses(
    project, clip, small_shards, monkeypatch, code
) -> None:
    tiny_model(clip, small_shards).save_pretrained(project / "models" / "vb")
    (project / "params.yaml").write_text(
        yaml.safe_dump({"captions": {"train_size": 48, "test_size": 12}, "render": {"steps": 2}})
    )
    outs = {
        "encode": project / "out" / "cond.safetensors",
        "generate": project / "out" / "out.png",
        "captions": project / "data" / "captions" / "test.parquet",
    }
    for path in outs.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"old")
    real_replace = os.replace

    def refuse(src, dst, *args, **kwargs):
        if Path(dst).absolute() in outs.values():
            raise OSError(code, os.strerror(code))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", refuse)
    for command, args in (
        ("encode", ["red circle", "--model", "models/vb", "-o", str(outs["encode"])]),
        ("generate", ["red circle", "--model", "models/vb", "-o", str(outs["generate"])]),
        ("captions", ["--out", str(outs["captions"].parent)]),
    ):
        result = cli(project, command, *args)
        assert result.exit_code == 2, (command, result.output)
        lines = result.output.strip().splitlines()
        assert lines[-1].startswith("error: ") and os.strerror(code) in lines[-1], lines
        assert str(outs[command]) in lines[-1]
        assert "Traceback" not in result.output
        assert outs[command].read_bytes() == b"old", command
        assert not list(outs[command].parent.glob(".*.tmp-*")), command


def test_the_cli_names_any_write_the_system_refuses(monkeypatch) -> None:
    from pipeline.cli import _run

    def step():
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "data/gap")

    with pytest.raises(typer.Exit) as caught:
        _run(step)
    assert caught.value.exit_code == 2

    def bug():
        raise OSError(errno.EIO, "input/output error")

    with pytest.raises(OSError):
        _run(bug)


# --- 9, 10: bounded resources ----------------------------------------------------------------


def test_captions_are_tokenised_in_batches() -> None:
    from pipeline.data import captions

    sizes = []

    def count(texts):
        sizes.append(len(texts))
        return [3] * len(texts)

    raw = (f"caption {k}" for k in range(3 * captions.TOKENIZE_BATCH + 5))
    result = clean_captions(raw, count)
    assert len(result.captions) == 3 * captions.TOKENIZE_BATCH + 5
    assert max(sizes) <= captions.TOKENIZE_BATCH and len(sizes) == 4


def test_a_prompt_of_many_parts_encodes_each_distinct_part_once(
    clip, small_shards, monkeypatch
) -> None:
    from pipeline.prompting import encoder as prompt_encoder

    encoder = PromptEncoder(clip, tiny_model(clip, small_shards).eval())
    words = [
        "red",
        "blue",
        "green",
        "yellow",
        "circle",
        "square",
        "star",
        "triangle",
        "big",
        "small",
        "white",
        "black",
    ]
    prompt = ", ".join(words[k % 12] for k in range(10_000))
    calls = []
    real = prompt_encoder.encode_texts

    def spy(clip_, texts):
        calls.append(len(texts))
        return real(clip_, texts)

    monkeypatch.setattr(prompt_encoder, "encode_texts", spy)
    start = time.perf_counter()
    pooled = encoder.embedding(prompt)
    assert time.perf_counter() - start < 30
    assert calls == [12]
    null = encoder.deprojector.null
    each = torch.cat([real(clip, [w]).pooled for w in words]).to(null)
    expected = (each - null).sum(0) * (10_000 // 12) + (each[: 10_000 % 12] - null).sum(0) + null
    torch.testing.assert_close(pooled[0], expected, rtol=1e-4, atol=1e-3)


# --- 11: training that diverges --------------------------------------------------------------


def test_training_that_diverges_stops_with_one_line_and_keeps_the_last_good_checkpoint(
    project, monkeypatch
) -> None:
    from pipeline.training import loop as train_module

    with pytest.raises(
        TrainingDiverged,
        match=r"vicinity-batch: training diverged at epoch 1: "
        r"train loss (nan|inf)",
    ):
        train_model("vicinity-batch", small_params(train={**TRAIN, "lr": 1e30}, models=MODELS))
    assert not (project / "models" / "vicinity-batch").exists()
    # a NaN after a good epoch: that epoch's checkpoint stays to resume from
    real = train_module.evaluate_loss
    losses = iter([None, float("nan")])

    def second_nan(*args, **kwargs):
        value = next(losses)
        return real(*args, **kwargs) if value is None else value

    monkeypatch.setattr(train_module, "evaluate_loss", second_nan)
    with pytest.raises(
        TrainingDiverged,
        match=r"at epoch 2: .* test loss nan .*the "
        r"checkpoint of epoch 1 is kept",
    ):
        train_model("vicinity-batch", small_params(train=TRAIN, models=MODELS))
    state = train_module.read_checkpoint(
        project / "data" / "checkpoints" / "vicinity-batch.pt", "cpu"
    )
    assert state is not None and len(state["history"]) == 1


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e400"])
def test_infinite_numbers_are_refused_in_every_section(tmp_path, value) -> None:
    from pipeline.config.params import load_params

    for section, key in (
        ("train", "lr"),
        ("render", "guidance_scale"),
        ("gap", "temperature"),
        ("augment", "split"),
    ):
        (tmp_path / "params.yaml").write_text(f"{section}:\n  {key}: {value}\n")
        with pytest.raises(ParamsError, match=rf"`{section}\.{key}` must be a finite number"):
            load_params(tmp_path / "params.yaml")


# --- 12: num_positions at load ---------------------------------------------------------------


@pytest.mark.parametrize("positions", [300, 76, 10_000])
def test_a_hand_edited_num_positions_is_refused_at_load(
    tmp_path, clip, small_shards, positions
) -> None:
    folder = tmp_path / "vb"
    tiny_model(clip, small_shards).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_positions": positions}))
    with pytest.raises(
        ModelFileError,
        match=rf"config\.json: num_positions must be 77 .*got "
        rf"{positions}",
    ):
        load_deprojector(folder)


# --- 14: experiments that cannot succeed fail at the first stage -----------------------------


def test_a_dropped_run_fails_the_base_stage_before_it_writes(project, base_dir) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    del params["models"]["vt-rollout"]  # dvc exp run -S '~models.vt-rollout'
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    for name in ("base.json", "base-clip.json"):
        (project / "models" / name).write_text("previous\n")
    result = cli(project, "base")
    assert result.exit_code == 2
    assert "vt-rollout" in result.output and "Traceback" not in result.output
    for name in ("base.json", "base-clip.json"):
        assert (project / "models" / name).read_text() == "previous\n"
    # DVC deletes the outputs of a stage before running it unless they persist; base runs
    # first in every experiment (always_changed), so its outputs persist.
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert dvc["stages"]["base"]["always_changed"]
    for out in dvc["stages"]["base"]["outs"]:
        assert next(iter(out.values()))["persist"] is True


# --- unsure: a 0-row split; fp16 on a CPU ----------------------------------------------------


def test_a_split_without_rows_is_named_at_extract_and_train(tmp_path) -> None:
    captions = tmp_path / "captions"
    captions.mkdir()
    pq.write_table(
        pa.table({"id": pa.array([], pa.int64()), "text": pa.array([], pa.string())}),
        captions / "test.parquet",
    )
    with pytest.raises(
        CaptionSourceError,
        match=r"test\.parquet: no captions in the test "
        r"split",
    ):
        read_split(captions, "test")
    shards = tmp_path / "shards"
    (shards / "test").mkdir(parents=True)
    (shards / "meta.json").write_text("{}")
    with pytest.raises(ShardError, match=r"test: no rows in this split"):
        ShardReader(shards / "test")


def test_fp16_on_a_cpu_is_said_once(project, capsys) -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # the process's other trainings set "no"
    try:
        train_model(
            "vicinity-batch",
            small_params(train={**TRAIN, "epochs": 1, "precision": "fp16"}, models=MODELS),
        )
    finally:
        AcceleratorState._reset_state(True)
    said = capsys.readouterr()
    assert (said.out + said.err).count("fp16 needs a GPU") == 1


def test_safetensors_written_by_the_atomic_writer_read_back_the_same(tmp_path) -> None:
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(1)}
    save_tensors(tmp_path / "x.safetensors", tensors, metadata={"format": "pt"})
    save_file(tensors, str(tmp_path / "y.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()
    assert atomic.WRITE_ERRNOS >= {errno.ENOSPC, errno.EROFS}
