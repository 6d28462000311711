"""The render stage's markdown report: grids, picture scores, image prompts, interpolation
and every model's test-set metrics side by side, each mean with its 95 % interval (`value
[low, high]`, pipeline/metrics/intervals.py)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config.params import Params, RenderParams
from pipeline.core.atomic import write_text
from pipeline.core.names import BLEND, REFERENCE, RETRIEVAL
from pipeline.metrics.image_metrics import PSNR_CAP_DB
from pipeline.metrics.intervals import ci_key
from pipeline.metrics.records import (
    ADHERENCE,
    ALL_PARTS,
    AUTOREGRESSIVE,
    CLIP_SCORE,
    COMBINATION,
    COSINE_MASKED,
    IMAGE_ROW_METRICS,
    IMAGE_TO_TEXT,
    SEED_SPREAD,
    TEACHER_FORCED,
)

METRIC_ROWS = (
    (TEACHER_FORCED, COSINE_MASKED, "teacher-forced cosine (in mask)"),
    (TEACHER_FORCED, "weighted_mse", "teacher-forced weighted MSE"),
    (TEACHER_FORCED, "mse", "teacher-forced MSE"),
    (AUTOREGRESSIVE, COSINE_MASKED, "autoregressive cosine (in mask)"),
    (AUTOREGRESSIVE, "weighted_mse", "autoregressive weighted MSE"),
    (AUTOREGRESSIVE, "mse", "autoregressive MSE"),
    (COMBINATION, "deprojector_cosine", "combination: deprojected Σ(e_k − null) + null"),
    (COMBINATION, "blend_cosine", "combination: blended hidden states"),
    (COMBINATION, "retrieval_cosine", "combination: retrieval of Σ(e_k − null) + null"),
    # The test split's image rows (augment.image): an image's embedding, its caption's states.
    (f"{IMAGE_ROW_METRICS}/{TEACHER_FORCED}", COSINE_MASKED, "image rows: teacher-forced cosine"),
    (f"{IMAGE_ROW_METRICS}/{AUTOREGRESSIVE}", COSINE_MASKED, "image rows: autoregressive cosine"),
)


def _group(metrics: dict, path: str) -> dict:
    for key in path.split("/"):
        metrics = metrics.get(key, {})
    return metrics


def _number(value: float) -> str:
    # A diverging model's squared errors reach 1e13: scientific notation keeps columns narrow.
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.3e}"


def _with_interval(scores: dict, key: str, form) -> str:
    """`value [low, high]` (the value alone where there is no interval), each as `form`."""
    text, bounds = form(scores[key]), scores.get(ci_key(key))
    return text if bounds is None else f"{text} [{form(bounds[0])}, {form(bounds[1])}]"


def metrics_table(metrics: dict[str, dict]) -> str:
    lines = ["| metric | " + " | ".join(metrics) + " |", "| --- |" + " ---: |" * len(metrics)]
    for group, key, label in METRIC_ROWS:
        groups = [_group(m, group) for m in metrics.values()]
        if not any(key in scores for scores in groups):
            continue  # e.g. no image rows in the test split
        cells = [
            _with_interval(scores, key, _number) if key in scores else "—" for scores in groups
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _paired(row: dict | None, negate: bool = False) -> str:
    """A paired difference `+d [low, high]` (negated: the pair's other order), or `—`."""
    if row is None:
        return "—"
    d, (low, high) = row["difference"], row["difference_ci95"]
    if negate:
        d, low, high = -d, -high, -low
    return f"{d:+.3f} [{low:+.3f}, {high:+.3f}]"


def _vs_retrieval(pairs: dict, name: str) -> str:
    """`name − retrieval` on autoregressive cosine, paired over the test rows."""
    if f"{name} vs {RETRIEVAL}" in pairs:
        return _paired(pairs[f"{name} vs {RETRIEVAL}"])
    return _paired(pairs.get(f"{RETRIEVAL} vs {name}"), negate=True)


def _cell(scores: dict | None, key: str, form: str = "{:.3f}") -> str:
    return _with_interval(scores, key, form.format) if scores and key in scores else "—"


def summary_table(
    metrics: dict[str, dict],
    comparison: dict,
    held_out: dict | None,
    image_prompts: dict | None,
) -> str:
    """One row per run and baseline, one column per question the report answers: states
    (autoregressive cosine in mask, and its paired difference to retrieval), "A B"
    (combination cosine), pictures (held-out adherence ratio to the reference per kind, every
    part shown, comma pictures − blend's, paired), image prompts (image / text)."""
    pairs = comparison.get("pairs", {})
    blend_pairs = comparison.get("adherence_vs_blend", {}).get("multi", {})
    pictures = held_out or {}
    single, multi = pictures.get("single", {}), pictures.get("multi", {})
    images = image_prompts or {}
    rows = [REFERENCE, *metrics, BLEND] if pictures else [*metrics]
    # Retrieval's record holds the baselines' combination cosines: its own and blend's.
    baseline_combination = {
        RETRIEVAL: "retrieval_cosine",
        BLEND: "blend_cosine",
        REFERENCE: None,
    }
    lines = [
        '| row | AR cosine (mask) | − retrieval (paired) | "A B" combination cosine '
        "| single: adherence ratio | comma: adherence ratio | every part shown: single / comma "
        "| comma − blend (paired) | image / text |",
        "| --- |" + " ---: |" * 8,
    ]
    for name in rows:
        states = _group(metrics.get(name, {}), AUTOREGRESSIVE)
        combination_key = baseline_combination.get(name, "deprojector_cosine")
        source = metrics.get(RETRIEVAL if name in baseline_combination else name, {})
        combination = _group(source, COMBINATION) if combination_key else None
        parts = " / ".join(
            f"{kind[name][ALL_PARTS]:.3f}" if ALL_PARTS in kind.get(name, {}) else "—"
            for kind in (single, multi)
        )
        cells = [
            _cell(states, COSINE_MASKED),
            "—" if name in (RETRIEVAL, REFERENCE, BLEND) else _vs_retrieval(pairs, name),
            _cell(combination, combination_key or ""),
            _cell(single.get(name), f"{ADHERENCE}_ratio", "{:.2f}"),
            _cell(multi.get(name), f"{ADHERENCE}_ratio", "{:.2f}"),
            parts,
            _paired(blend_pairs.get(name)),
            _cell(images.get(name), IMAGE_TO_TEXT, "{:.2f}"),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def noise_line(comparison: dict) -> str:
    """The best run by autoregressive cosine and which rows are within the noise of it."""
    cosine = comparison.get("autoregressive_cosine_masked")
    if not cosine:
        return ""
    groups: dict[bool | None, list[str]] = {True: [], False: [], None: []}
    for name, row in cosine["rows"].items():
        groups[row["within_noise"]].append(name)
    text = (
        f"Best autoregressive cosine (in mask): **{cosine['best']}**. Within the noise of "
        f"it (the 95 % paired bootstrap interval of the difference contains 0): "
        f"{', '.join(groups[True]) or 'none'}; clearly different: "
        f"{', '.join(groups[False]) or 'none'}"
    )
    if groups[None]:
        text += f"; too few test rows to tell: {', '.join(groups[None])}"
    return text + " (`reports/metrics/comparison.json`)."


def pairs_table(comparison: dict) -> str:
    """Every pair of runs (seed replicates aside) and retrieval: the paired difference of
    their autoregressive cosine with its interval, and whether it is a difference at all."""
    pairs = {k: v for k, v in comparison.get("pairs", {}).items() if isinstance(v, dict)}
    if not pairs:
        return ""
    lines = [
        "| first vs second | first − second [95 % interval] | verdict |",
        "| --- | ---: | --- |",
    ]
    for name, row in pairs.items():
        verdict = {
            True: "no difference (within the noise)",
            False: "differs",
            None: "too few rows to tell",
        }[row["within_noise"]]
        lines.append(
            f"| {name} | {_with_interval(row, 'difference', '{:+.4f}'.format)} | {verdict} |"
        )
    return (
        "\n\nEvery pair, paired over the test rows (autoregressive cosine in mask, "
        "`comparison.json` `pairs`):\n\n" + "\n".join(lines)
    )


SPREAD_COLUMNS = (
    ("autoregressive_cosine_masked", "AR cosine (mask)"),
    ("teacher_forced_cosine_masked", "TF cosine (mask)"),
    ("combination_deprojector_cosine", "combination cosine"),
    ("adherence_single", "adherence single"),
    ("adherence_multi", "adherence multi"),
)


def seed_spread_table(comparison: dict) -> str:
    """Per group of seed replicates: mean ± standard deviation [min, max] over the seeds."""
    spread = comparison.get(SEED_SPREAD)
    if not spread:
        return ""
    columns = [
        (key, label)
        for key, label in SPREAD_COLUMNS
        if any(key in entry for entry in spread.values())
    ]
    lines = [
        "| run | seeds | " + " | ".join(label for _, label in columns) + " |",
        "| --- | --- |" + " ---: |" * len(columns),
    ]
    for name, entry in spread.items():
        cells = [
            f"{entry[key]['mean']:.4f} ± {entry[key]['std']:.4f} "
            f"[{entry[key]['min']:.4f}, {entry[key]['max']:.4f}]"
            if key in entry
            else "—"
            for key, _ in columns
        ]
        lines.append(
            f"| {name} | {', '.join(map(str, entry['seeds']))} | " + " | ".join(cells) + " |"
        )
    return (
        "\n\n### Spread over training seeds\n\nRuns that differ only in `train.seed` "
        "(initial weights and batch order), as mean ± standard deviation [min, max] over "
        "the seeds (`comparison.json` `seed_spread`). The intervals above resample test "
        "rows for one trained model; this is the variation between trainings:\n\n"
        + "\n".join(lines)
    )


def fidelity_table(fidelity: dict[str, dict]) -> str:
    prompts = list(next(iter(fidelity.values()))["per_prompt"])
    head = "| model | " + " | ".join(f"`{p}`" for p in prompts) + " | mean |"
    lines = [head, "| --- |" + " --- |" * (len(prompts) + 1)]
    for name, scores in fidelity.items():
        cells = [scores["per_prompt"][p] for p in prompts] + [scores]
        lines.append(
            f"| {name} | "
            + " | ".join(f"{c['cosine']:.3f} / {c['psnr']:.1f} dB / {c['ssim']:.3f}" for c in cells)
            + " |"
        )
    return "\n".join(lines)


def _score(scores: dict, key: str) -> str:
    if key not in scores:
        return "—"
    text = _with_interval(scores, key, "{:.1f}".format if key == CLIP_SCORE else "{:.3f}".format)
    ratio = scores.get(f"{key}_ratio")
    return text if ratio is None else f"{text} ({ratio:.2f}×)"


def picture_table(by_kind: dict[str, dict[str, dict]], all_parts: bool = False) -> str:
    """Rows × kinds: mean adherence and CLIP score, with each ratio to the reference row."""
    kinds = [k for k in ("single", "multi") if by_kind.get(k)]
    head = "| row | " + " | ".join(f"{k}: adherence | {k}: CLIP score" for k in kinds)
    lines = [head + (" | multi: every part shown |" if all_parts else " |")]
    lines.append("| --- |" + " ---: | ---: |" * len(kinds) + (" ---: |" if all_parts else ""))
    for row in dict.fromkeys(row for k in kinds for row in by_kind[k]):
        # Rows only one kind has (the image-prompt rows, blend) are blank in the others.
        cells = [
            f"{_score(by_kind[k][row], ADHERENCE)} | {_score(by_kind[k][row], CLIP_SCORE)}"
            if row in by_kind[k]
            else "– | –"
            for k in kinds
        ]
        if all_parts:
            cells.append(
                _score(by_kind["multi"][row], ALL_PARTS) if row in by_kind["multi"] else "–"
            )
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def adherence_noise_line(comparison: dict) -> str:
    """Per kind, the runs whose held-out adherence is within the noise of the reference's."""
    adherence = comparison.get(ADHERENCE)
    if not adherence:
        return ""
    kinds = [
        f"{kind}: {', '.join(n for n, r in rows.items() if r['within_noise']) or 'none'}"
        for kind, rows in adherence.items()
        if kind in ("single", "multi")
    ]
    return (
        "\n\nRuns whose held-out adherence is within the noise of the reference row's (the "
        "95 % interval of the difference, paired over prompts, contains 0): "
        + "; ".join(kinds)
        + "."
    )


def blend_line(comparison: dict) -> str:
    """Comma prompts: which rows draw better, as well as, or worse than blending the parts'
    states (the paired interval of the difference above, around or below 0)."""
    against = comparison.get("adherence_vs_blend", {}).get("multi")
    if not against:
        return ""
    verdicts: dict[str, list[str]] = {"better": [], "no different": [], "worse": []}
    for name, d in against.items():
        low, high = d["difference_ci95"]
        verdicts["better" if low > 0 else "worse" if high < 0 else "no different"].append(name)
    return (
        '\n\n"A, B" against blending (`blend`: the comma parts\' ordinary states averaged, '
        "compel's `.blend()`; adherence on the comma prompts, paired over prompts, 95 % "
        "interval of the difference): "
        + "; ".join(f"{v}: {', '.join(names) or 'none'}" for v, names in verdicts.items())
        + "."
    )


def pictures_section(scores: dict[str, dict], held_out: dict | None, comparison: dict) -> str:
    if not scores["single"]:
        return ""
    text = """## Do the pictures show the prompt?

Each cell of the grids is labelled with its *adherence* (the fraction of the attributes the
prompt states — background colour, each object's colour and shape — that the world's judge
finds in the picture; only with the builtin world) and its *CLIP score*, 100 × max(0,
cos(image_embeds, text_embeds)) with the base CLIP. Means over the grid's prompts, with each
row's ratio to the reference row:

""" + picture_table(scores)
    if held_out:
        e = next(iter(held_out["single"].values()))["prompts"]
        text += f"""

Held-out prompts ({e} per kind, scenes of 1–3 objects with a background, none of them a grid
prompt; the same seed per prompt in every row; `reports/metrics/adherence.json`). *single*
deprojects the pooled embedding of the whole prompt (tags without commas); *multi* splits
the same tags at commas and deprojects Σ(e_k − null) + null. "Every part shown" counts the
comma-combined prompts whose every stated attribute the judge finds. Each mean with its 95 %
bootstrap interval over the prompts:

{picture_table(held_out, all_parts=ALL_PARTS in next(iter(held_out["multi"].values())))}\
{adherence_noise_line(comparison)}{blend_line(comparison)}

![adherence](plots/adherence.png)"""
    return text + "\n"


def _adherence(rows: dict, key: str) -> str:
    return (
        _with_interval(rows[key], ADHERENCE, "{:.3f}".format)
        if key in rows and ADHERENCE in rows[key]
        else "–"
    )


def _by_bridge(rows: dict) -> dict:
    """A run's image-prompt summaries by bridge: every bridge's with evaluate.bridges `all`,
    else its own bridge's (`image`); {} for the reference row."""
    if "bridges" in rows:
        return rows["bridges"]
    return {rows["bridge"]: rows["image"]} if "bridge" in rows else {}


def extras_section(
    showcase: str | None,
    image_prompts: dict | None,
    curves: dict[str, dict] | None,
    r: RenderParams,
) -> str:
    """Images as prompts and the judged interpolation (the world only)."""
    text = ""
    if showcase:
        text += f"""## Images as prompts

The single-embedding grid's last two rows: `scene` is a drawn scene with everything the
column's prompt states, `image prompt` the picture generated from that scene alone through
`{showcase}` (render.showcase_model): CLIP vision tower → image_embeds → bridge to text
space (gap.bridge, data/gap) → pseudo-inverse of the text projection → deprojector.

"""
    if image_prompts:
        bridged = [rows for rows in image_prompts.values() if "bridge" in rows]
        kinds = list(_by_bridge(bridged[0])) if bridged else []
        own = bridged[0]["bridge"] if bridged else ""
        lines = [
            "| run | text prompt | "
            + " | ".join(f"image, {k}" for k in kinds)
            + " | image / text |",
            "| --- | ---: |" + " ---: |" * (len(kinds) + 1),
        ]
        for name, rows in image_prompts.items():
            ratio = (
                _with_interval(rows, IMAGE_TO_TEXT, "{:.2f}".format)
                if IMAGE_TO_TEXT in rows
                else "–"
            )
            cells = [_adherence(_by_bridge(rows), k) for k in kinds]
            lines.append(f"| {name} | {_adherence(rows, 'text')} | {' | '.join(cells)} | {ratio} |")
        count = next(iter(image_prompts.values()))["text"]["prompts"]
        text += (
            f"""Held-out drawn scenes ({count}) as the only prompt, judged against their
descriptions; the text prompt is the description's pooled embedding deprojected (the
reference row: its ordinary CLIP states). One column per bridge from image to text space
(gap.bridge); image / text is the runs' own bridge, `{own}`. Mean adherence with its 95 %
interval over the scenes (`reports/metrics/image_prompts.json`):

"""
            + "\n".join(lines)
            + "\n\n"
        )
    if curves:
        mode = "spherical" if r.interpolation_slerp else "linear"
        lines = [
            "| run | balance t=0 | t=0.5 | t=1 | max jump | reversals |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, c in curves.items():
            middle = c["balance"][len(c["balance"]) // 2]
            lines.append(
                f"| {name} | {c['balance'][0]:+.2f} | {middle:+.2f} | "
                f"{c['balance'][-1]:+.2f} | {c['max_jump']:.2f} | {c['reversals']} |"
            )
        text += (
            f"""## Interpolation: {r.interpolation_from} → {r.interpolation_to}

The combined embeddings of the two prompts interpolated around null ({mode}), deprojected by
each run; one row per run, seed {r.seed}:

![interpolation](interpolation.png)

Judged over {r.interpolation_seeds} seeds per t: balance = adherence to
"{r.interpolation_to}" − adherence to "{r.interpolation_from}" (−1: only A, +1: only B). A
gradual change has small jumps between neighbouring t and no reversals
(`reports/interpolation.json`):

"""
            + "\n".join(lines)
            + "\n\n![interpolation balance](plots/interpolation.png)\n\n"
        )
    return text


def write_report(
    path: Path,
    params: Params,
    metrics: dict[str, dict],
    comparison: dict,
    fidelity: dict[str, dict],
    scores: dict[str, dict],
    held_out: dict | None,
    extras: str = "",
    image_prompts: dict | None = None,
) -> None:
    r = params.render
    text = f"""# CLIP Text Deprojector: comparison report

Written by `deprojector render`. Base models: clip `{params.base.clip}`, sd `{params.base.sd}`.
Every image: {r.width}×{r.height} px, {r.steps} steps of `{r.scheduler}`, guidance scale
{r.guidance_scale}, seed {r.seed} (the same for every cell of a column), negative prompt "".
Rows: `reference` is conditioned on the ordinary CLIP last hidden state of the prompt; the
other rows on the hidden states their deprojector generated from one embedding.

## In one table

Every run and baseline against the questions below, each with its 95 % interval: the
generated states' cosine to CLIP's (autoregressive, in mask; test rows) and its difference
to retrieval's, paired over the same rows; the combination cosine, the states generated
from e(A) + e(B) − null against those of "A B"; held-out pictures, adherence as a ratio to
the reference row's, the share of comma prompts with every part shown, and comma pictures
against blending the parts' states, paired over prompts; an image as the only prompt against
its description (image / text). Each column is detailed in its section below.

{summary_table(metrics, comparison, held_out, image_prompts)}

## Single embedding: the whole prompt's pooled embedding, deprojected

![single-embedding grid](grid_single.png)

## Multiple embeddings: the prompt split at commas, combined as Σ(e_k − null) + null

![multiple-embedding grid](grid_multi.png)

## Fidelity of each cell to the reference of its column

Each cell reads *cosine / PSNR / SSIM*: the cosine similarity between the model's
conditioning and the reference conditioning, averaged over positions 1..76 (position 0 is
the constant start-of-text state, equal in both), then PSNR and SSIM (Gaussian window,
luminance) of the image against the reference image of the same column. PSNR is capped at
{PSNR_CAP_DB:.0f} dB, the value identical images get. Also in `fidelity.json`.

### Single embedding

{fidelity_table(fidelity["single"])}

### Multiple embeddings

{fidelity_table(fidelity["multi"])}

{pictures_section(scores, held_out, comparison)}{extras}## Test-set metrics (`reports/metrics/`)

{metrics_table(metrics)}

{noise_line(comparison)}

Each value is a mean over the test rows with its 95 % interval (a percentile bootstrap over
the rows, `value [low, high]`). Cosines are averaged over the positions inside the attention
mask. `null-baseline` outputs `null` at every position; `retrieval` answers each embedding with
the mean hidden states of its {metrics[RETRIEVAL]["k"]} nearest training rows by cosine of
e − null (k chosen on a validation split of the training rows; no teacher
forcing, so both modes are the same). The combination rows compare, on held-out caption pairs
A, B, the states of "A B" with the deprojection of the combined embedding, with the average of
the two captions' states and with the retrieval's answer to the combined embedding.\
{pairs_table(comparison)}{seed_spread_table(comparison)}

## Autoregressive cosine per position

![cosine per position](plots/cosine_per_position.png)
"""
    write_text(path, text)
