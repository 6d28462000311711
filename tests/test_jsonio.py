"""Stored results are rounded to 6 significant digits, so float noise below that is invisible."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pipeline.core.jsonio import round_floats, write_json


def test_round_floats_keeps_six_significant_digits_at_every_scale() -> None:
    data = {
        "cos": 0.95078295705186,
        "mse": 0.000123456789,
        "psnr": 26.90327996247178,
        "big": 123456789.0,
        "n": 100,
        "flag": True,
        "name": "x",
        "rows": [{"a": 1.0000004}, (2.5e-12,)],
    }
    assert round_floats(data) == {
        "cos": 0.950783,
        "mse": 0.000123457,
        "psnr": 26.9033,
        "big": 123457000.0,
        "n": 100,
        "flag": True,
        "name": "x",
        "rows": [{"a": 1.0}, [2.5e-12]],
    }
    assert math.isnan(round_floats(float("nan")))
    assert round_floats(float("inf")) == float("inf")


def test_differences_below_the_sixth_digit_give_identical_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_json(a, {"cosine": 0.7667259573936462, "loss": [0.2755913734436035]})
    write_json(b, {"cosine": 0.7667259573936462 + 1e-8, "loss": [0.2755913734436035 - 1e-9]})
    assert a.read_bytes() == b.read_bytes()


def test_write_json_keeps_key_order_ends_with_newline_and_leaves_no_temp_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "deep" / "metrics.json"
    write_json(path, {"teacher_forced": 1.5, "autoregressive": 0.25})
    text = path.read_text()
    assert text == '{\n  "teacher_forced": 1.5,\n  "autoregressive": 0.25\n}\n'
    assert list(json.loads(text)) == ["teacher_forced", "autoregressive"]
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_json(path, {"cosine": 0.5})
    with pytest.raises(TypeError):
        write_json(path, {"cosine": object()})
    assert json.loads(path.read_text()) == {"cosine": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
