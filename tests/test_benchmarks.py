"""Every benchmark at its tiny size: the modules import and run end to end and return what
the README quotes. No timing targets (the machine is shared): only that the figures exist
and the ratios are finite and positive."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.benchmarks import (
    extraction,
    generation,
    one_pass,
    pictures,
    step_profile,
    training,
)
from pipeline.cli import app
from pipeline.experiments import (
    bridges,
    embedding_probe,
    schedulers,
    token_decoder,
    training_variants,
    world_recipes,
)
from pipeline.models import ARCHITECTURES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def project_root(monkeypatch):
    """The benchmarks load the committed world (models/world) and params.yaml from here;
    `bench --threads` sets torch's thread count for the process: restored afterwards."""
    monkeypatch.chdir(ROOT)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def check_extraction(r: dict, hidden_size: int) -> None:
    assert r["hidden_size"] == hidden_size
    assert r["texts_encoded"] >= r["captions"] > 0
    for key in (
        "extract_s_median",
        "bare_forward_s_median",
        "ratio_median",
        "captions_per_s",
        "shard_bytes_per_row",
    ):
        assert positive(r[key]), key
    # float16 hidden states are most of a row: 77 x D x 2 bytes
    assert r["shard_bytes_per_row"] > 77 * hidden_size * 2


def check_generation(r: dict) -> None:
    assert positive(r["clip_encoder_forward_s"])
    assert set(r["models"]) == set(ARCHITECTURES)
    for name, entry in r["models"].items():
        for key in ("generate_s", "ratio_to_encoder", "naive_generate_s", "cache_speedup"):
            assert positive(entry[key]), (name, key)


def check_profile(p: dict) -> None:
    assert set(p["models"]) == set(ARCHITECTURES)
    assert p["hidden_size"] == 128  # the builtin world CLIP
    for name, entry in p["models"].items():
        f = entry["fractions"]
        assert set(step_profile.ARITHMETIC + step_profile.OVERHEAD) <= set(f), name
        assert all(math.isfinite(v) and v >= 0 for v in f.values()), (name, f)
        assert positive(entry["step_s"]) and entry["steps"] > 0
        for key in ("overhead_fraction", "arithmetic_fraction"):
            assert 0 < entry[key] < 1, (name, key, entry[key])
        assert entry["overhead_fraction"] + entry["arithmetic_fraction"] == pytest.approx(1)
        assert f["read_gather"] + f["read_convert"] == pytest.approx(f["read"])
        assert positive(f["forward"]) and positive(f["backward"]) and positive(f["read"])


def check_training(r: dict) -> None:
    i = r["input_overhead"]
    assert i["rows"] > 0 and i["hidden_size"] == 128
    for key in ("streamed_s_median", "in_memory_s_median", "read_only_s_median", "ratio_median"):
        assert positive(i[key]), key
    s = r["step"]
    assert set(s["models"]) | set(s["no_plain_reference"]) == set(ARCHITECTURES)
    for name, entry in s["models"].items():
        assert positive(entry["ratio_median"]), name
        assert entry["max_abs_output_diff"] <= 1e-4 and entry["max_grad_rel_diff"] <= 1e-3
    m = r["memory"]
    assert m["rows_4n"] == 4 * m["rows_n"] > 0
    assert positive(m["peak_n_mib"]) and positive(m["ratio_median"])
    assert isinstance(r["all_pass"], bool)
    check_profile(r["profile"])


def check_pictures(p: dict) -> None:
    assert p["prompts"] == pictures.TINY["prompts"] and p["steps"] == pictures.TINY["steps"]
    assert set(p["paths"]) == {"pipeline", "direct"}
    for entry in p["paths"].values():
        assert positive(entry["pictures_per_s"])
        assert set(entry["fractions"]) == set(pictures.SEGMENTS)
        assert positive(entry["fractions"]["unet"])
        assert sum(entry["fractions"].values()) == pytest.approx(1)
    assert positive(p["speedup_median"]) and p["guidance_share"] < 1
    # The direct path draws the bytes StableDiffusionPipeline draws.
    assert p["pixels_equal"] is True
    assert all(positive(n) for n in p["stages"]["pictures"].values())
    assert sum(p["stages"]["shares"].values()) == pytest.approx(1)


def check_schedulers(rows: list[dict]) -> None:
    assert [(r["scheduler"], r["guidance_scale"]) for r in rows] == [
        (s, g) for s, _, g in schedulers.SETTINGS
    ]
    for row in rows:
        assert row["prompts"] == schedulers.TINY["prompts"]
        assert row["steps"] <= schedulers.TINY["max_steps"]
        assert 0 <= row["adherence"] <= 1 and math.isfinite(row["clip_score"])


@pytest.mark.slow
def test_bench_command_tiny_runs_every_benchmark():
    # One torch thread: on a busy 2-core machine two threads wait on each other for seconds.
    result = CliRunner().invoke(
        app, ["bench", "--tiny", "--schedulers", "--threads", "1", "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["tiny"] is True
    check_extraction(out["extraction"], 128)
    check_extraction(out["extraction_clip_l"], 768)
    assert out["extraction_clip_l"]["layers"] == extraction.TINY_CLIP_L["layers"]
    assert positive(out["extraction_clip_l"]["article_scale"]["disk_gb"])
    check_generation(out["generation"])
    assert out["generation"]["hidden_size"] == generation.TINY["width"]
    check_training(out["training"])
    assert out["training"]["step"]["hidden_size"] == training.TINY["step_width"]
    check_pictures(out["pictures"])
    check_schedulers(out["schedulers"])

    # Each module's text report of the same results (what `python -m ...` prints).
    for module, section in (
        (extraction, "extraction"),
        (extraction, "extraction_clip_l"),
        (generation, "generation"),
        (training, "training"),
        (pictures, "pictures"),
        (schedulers, "schedulers"),
        (step_profile, None),
    ):
        module.print_report(out["training"]["profile"] if section is None else out[section])


@pytest.mark.parametrize(
    "module",
    [
        extraction,
        generation,
        schedulers,
        step_profile,
        training,
        bridges,
        world_recipes,
        embedding_probe,
        token_decoder,
        one_pass,
    ],
)
def test_each_module_has_a_command_line_with_tiny_sizes(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    assert "--tiny" in capsys.readouterr().out


@pytest.mark.slow
def test_the_bridge_table_runs_every_variant_at_tiny_size(capsys):
    table = bridges.main(["--tiny", "--runs", "vt-rollout"])
    assert list(table) == [bridges.TEXT_ONLY, "none", "mean-shift", "linear", "text-projection"]
    for name, variant in table.items():
        run = variant["runs"]["vt-rollout"]
        assert -1 <= run["cosine_masked"]["cosine_masked"] <= 1
        # Image rows exist (and are scored) exactly when the variant trains on them.
        assert ("image_rows_cosine_masked" in run) == (name != bridges.TEXT_ONLY)
        assert set(run["image_prompts"]) == {
            "text",
            "none",
            "mean-shift",
            "linear",
            "text-projection",
        }
        assert 0 <= run["text_adherence_single"]["adherence"] <= 1
        # Every variant's text prompts against the same run without image rows, paired.
        paired = run.get("text_adherence_multi_vs_text_only")
        assert (paired is None) == (name == bridges.TEXT_ONLY)
        if paired:
            assert -1 <= paired["difference"] <= 1 and "within_noise" in paired
    # The runs trained without image rows, scored on every bridge's image rows.
    text_only = table[bridges.TEXT_ONLY]["runs"]["vt-rollout"]
    assert list(text_only["image_rows_cosine_masked_by_bridge"]) == list(table)[1:]


@pytest.mark.slow
def test_the_world_recipe_ablations_run_and_resume_at_tiny_size(tmp_path):
    out = tmp_path / "recipes.json"
    table = world_recipes.main(["--tiny", "--out", str(out)])
    assert json.loads(out.read_text()) == table
    world = table["world"]
    for kind in world_recipes.KINDS:
        assert 0 <= world["reference"][kind]["adherence"] <= 1
        assert len(world["per_prompt"][kind]) == world["reference"][kind]["prompts"] == 4
    for kind in world_recipes.KINDS:
        by_objects = world["reference_by_objects"][kind]
        assert list(by_objects) == ["1_object", "2_objects", "3_objects"]
        assert all(
            row["prompts"] == 4 and 0 <= row["adherence"] <= 1 for row in by_objects.values()
        )
    for reads in ("crisp", "round_trip"):
        assert 0 <= world["judge"][reads]["exact"] <= 1
    sweep = table["guidance"]
    assert list(sweep["scales"]) == ["1.0", "3.0"] and sweep["chosen"] in sweep["scales"]
    assert list(sweep["scales"]["3.0"]) == ["1_object", "2_objects", "3_objects"]
    assert all(0 <= row["adherence"] <= 1 for row in sweep["scales"]["1.0"].values())
    assert list(table["vae"]) == ["baseline", "width-32"]
    assert table["vae"]["width-32"]["settings"] == {"vae_width": 32}
    assert positive(table["vae"]["baseline"]["psnr_db"])
    assert list(table["unet"]) == ["baseline", "min-snr-5"]
    paired = table["unet"]["min-snr-5"]["reference"]["multi"]["vs_first_arm"]
    assert -1 <= paired["difference"] <= 1
    # Measured arms are kept: a second run finds them and trains nothing.
    again = world_recipes.main(["--tiny", "--out", str(out)])
    assert again["unet"] == table["unet"] and again["vae"] == table["vae"]


def test_the_guidance_sweep_is_chosen_on_prompts_no_row_scores():
    """Validation prompts share no prompt with evaluate's held-out prompts, the --world rows
    or the grids, so the chosen scale is not tuned on the prompts it is reported on."""
    from pipeline.config.params import load_params
    from pipeline.world.embedded import World

    params = load_params(Path("params.yaml"))
    count, seed = 40, params.evaluate.seed
    grid = world_recipes.grid_prompts(params)
    scored = set(grid)
    for by_kind in [
        World.held_out_prompts(count, seed, grid),
        *world_recipes.prompts_by_objects(count, seed, grid).values(),
    ]:
        scored |= {p for kind in by_kind.values() for p in kind}
    validation = world_recipes.validation_prompts(params, count)
    prompts = {p for by_kind in validation.values() for kind in by_kind.values() for p in kind}
    assert all(len(kind) == count for by_kind in validation.values() for kind in by_kind.values())
    assert not prompts & scored
    assert all(
        World.objects(p) == k for k, by_kind in validation.items() for p in by_kind["single"]
    )


def test_held_out_prompts_by_object_count_state_that_many_objects():
    from pipeline.world.embedded import World

    by_objects = world_recipes.prompts_by_objects(20, 0, {"red circle white background"})
    for k, kinds in by_objects.items():
        assert len(kinds["single"]) == len(kinds["multi"]) == 20
        assert all(World.objects(p) == k for p in kinds["single"] + kinds["multi"])
        assert "red circle white background" not in kinds["single"]


def test_steps_sweep_pairs_every_count_against_the_first():
    result = schedulers.run_steps(steps=(2, 1), per_objects=1)
    assert result["prompts_per_kind"] == 3  # one prompt each of 1, 2 and 3 objects
    assert [row["steps"] for row in result["rows"]] == [2, 1]
    for row in result["rows"]:
        for kind in ("single", "multi"):
            assert 0 <= row[kind]["adherence"] <= 1 and positive(row[kind]["sampling_s"])
    assert all(
        result["rows"][0][kind]["vs_first"]["difference"] == 0 for kind in ("single", "multi")
    )
    schedulers.print_steps_report(result)


def test_the_embedding_probe_reads_facts_back_and_draws_them_at_tiny_size():
    prompt = "red circle blue star white background"
    background, pairs = embedding_probe.facts(prompt)
    # the pairs in the judge's class order (PAIRS: colours as COLOR_NAMES lists them)
    assert embedding_probe.as_prompt(background, pairs) == "red circle blue star white background"
    assert embedding_probe.facts(embedding_probe.as_prompt(background, pairs)) == (
        background,
        pairs,
    )
    # A shape stated alone leaves the pair of each colour with it undecided (not a negative).
    background, pairs, decided = embedding_probe.targets(["black background, star, big"])
    assert background.tolist() == [5] and pairs.sum() == 0 and decided.sum() == 24 - 6
    # --captions: the training captions' partial statements train the probe as they are.
    captions = ["black background, star, big", "a red thing", "red circle blue star"]
    probe = embedding_probe.train_probe(torch.randn(3, 128), captions, epochs=1)
    assert len(embedding_probe.read_back(probe, torch.randn(2, 128))) == 2
    result = embedding_probe.run(**embedding_probe.TINY)
    for kind in ("single", "multi"):
        read = result[kind]["read_back"]
        assert 0 <= read["exact"] <= read["background"] <= 1
        pictures = result[kind]["pictures"]
        assert set(pictures) == {"reference", embedding_probe.REWRITTEN}
        assert pictures["reference"]["prompts"] == embedding_probe.TINY["prompts"]
        assert 0 <= pictures[embedding_probe.REWRITTEN]["adherence"] <= 1


def test_the_token_decoder_learns_caption_tokens_and_is_judged_beside_queries(tmp_path):
    """On shards extracted here with the committed world (a fresh clone has none before its
    first `dvc repro`), beside the committed `queries` run."""
    from pipeline.base.loaders import load_clip
    from tests.conftest import run_small_pipeline

    clip = load_clip("builtin")
    captions = ["red circle blue star", "big yellow star black background"]
    targets = token_decoder.token_targets(clip, captions)
    eos = clip.tokenizer.eos_token_id
    for row, caption in zip(targets.tolist(), captions, strict=True):
        ids = [t for t in row if t != token_decoder.IGNORE]
        # BOS, the tokens, EOS, then nothing to learn
        assert ids[0] == clip.tokenizer.bos_token_id and ids[-1] == eos
        assert clip.tokenizer.decode(ids[1:-1]) == caption
    shards = run_small_pipeline(tmp_path, ROOT / "models" / "world")
    # greedy + 1 sampled candidate
    result = token_decoder.run(candidates=2, shards=shards, **token_decoder.TINY)
    assert result["train_rows"] == token_decoder.TINY["rows"] and len(result["history"]) == 1
    states = result["states"]["captions"]
    assert 0 < states["tokens"] <= 1 and "difference_ci95" in states["tokens_minus_queries"]
    assert {"tokens", "queries", "blend", "tokens_minus_blend"} <= set(result["combination"])
    single, multi = result["pictures"]["single"], result["pictures"]["multi"]
    assert {"reference", "queries", "tokens"} <= set(single) and "blend" not in single
    assert "blend" in multi and "tokens_minus_blend" in multi
    assert len(multi["examples"]) == token_decoder.TINY["prompts"]


def test_ranking_by_parts_finds_the_cut_whose_parts_sum_to_the_input():
    """A comma prompt's input Σ(e_k − null) + null: the candidate that says its parts scores
    ~1 at the right cut; a candidate with the colours swapped scores lower; every cut of up to
    3 parts is tried."""
    from pipeline.base.clip_encode import encode_texts
    from pipeline.base.loaders import load_clip

    assert token_decoder.splits("red circle blue", 3) == [
        ["red circle blue"],
        ["red", "circle blue"],
        ["red circle", "blue"],
        ["red", "circle", "blue"],
    ]
    clip = load_clip("builtin")
    null = encode_texts(clip, [""]).pooled[0].float()
    parts = encode_texts(clip, ["red circle", "blue square"]).pooled.float()
    target = ((parts - null).sum(dim=0) + null).expand(2, -1)
    said = ["red circle blue square", "blue circle red square"]
    score = token_decoder.parts_closeness(clip, said, target, null)
    assert score[0] > 0.999 > score[1]


def test_training_variants_judge_each_arm_against_its_baseline():
    """Two committed runs as the `queries` arm and an arm whose baseline it is: both judged
    on the same held-out prompts, the arm paired against its baseline."""
    from pipeline.config.params import load_params
    from pipeline.models import Deprojector

    models = {
        "queries": Deprojector.from_pretrained(ROOT / "models" / "queries"),
        "queries-states-unet": Deprojector.from_pretrained(ROOT / "models" / "queries-unet"),
    }
    judged = training_variants.judge_pictures(models, load_params(ROOT / "params.yaml"), 3)
    for kind in ("single", "multi"):
        assert 0 <= judged["queries"][kind]["adherence"] <= 1
        assert "adherence_ratio" in judged["queries"][kind]
        assert "vs_baseline" not in judged["queries"][kind]
        paired = judged["queries-states-unet"][kind]["vs_baseline"]
        assert -1 <= paired["difference"] <= 1


def test_one_pass_variants_are_timed_at_tiny_size():
    result = one_pass.main(["--tiny"])
    assert set(result["models"]) == set(one_pass.VARIANTS)
    for entry in result["models"].values():
        assert positive(entry["ratio_to_encoder"]) and "naive_generate_s" not in entry
