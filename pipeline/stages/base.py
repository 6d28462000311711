"""The `base` stage: check `base.clip` / `base.sd` and record the fingerprint of every file
they load (models/base.json; the CLIP's alone in models/base-clip.json).

The first stage of every `dvc repro` (always changed), so it also checks what the later
stages would refuse (the `models:` runs against the registry) before any output is replaced."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.base.checks import BaseReport, check_base
from pipeline.config.params import Params
from pipeline.config.runs import check_runs
from pipeline.core.atomic import write_text


def run_base_stage(
    params: Params, out: Path = Path("models/base.json"), clip_out: Path | None = None
) -> BaseReport:
    """Writes `out` and `clip_out` (default: base-clip.json beside `out`)."""
    check_runs(params.models)
    report = check_base(params.base.clip, params.base.sd)
    clip_path = clip_out or out.with_name("base-clip.json")
    for path, record in ((out, report.as_json()), (clip_path, report.clip_json())):
        write_text(path, json.dumps(record, indent=2) + "\n")
    return report
