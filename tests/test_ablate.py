"""Ablation suites from a user's point of view: one cache, every row and figure, reuse, pairing, resume."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from typer.testing import CliRunner

from clipspm.cli import app
from clipspm.config import resolve_config
from clipspm.errors import ClipspmError
from clipspm.experiments.ablate import AblateOptions, run_ablation
from clipspm.experiments.report import paper_numbers
from clipspm.experiments.suites import SuiteSettings, load_suite, parse_suite, shipped_suites, variant_config
from tests.conftest import OTAM_SUITE_YAML, kill_when_written, run_cli

# A schedule of a few seconds per run: 2 steps of 4 episodes, few validation and test episodes.
SHORT = ("data.train_views=2", "train.episodes_per_step=4", "train.val_every=8", "train.val_episodes=10",
         "train.log_every=4")
EVAL_EPISODES = 40


def suite_options(cache: Path, runs_dir: Path, suite: str, **changes) -> AblateOptions:
    """Options that address the session's synthetic cache by its settings, as a user's command would."""
    defaults = {"suite": suite, "dataset": "synthetic", "root": cache.parent.parent / "data",
                "cache_dir": cache.parent, "shots": (1, 3), "episodes": 8, "eval_episodes": EVAL_EPISODES,
                "overrides": SHORT, "devices": ("cpu",), "runs_dir": runs_dir, "progress": False}
    return AblateOptions(**{**defaults, **changes})


def cli_options(cache: Path, runs_dir: Path, *extra: str) -> list[str]:
    sets = [item for override in SHORT for item in ("--set", override)]
    return ["--dataset", "synthetic", "--root", str(cache.parent.parent / "data"), "--cache-dir", str(cache.parent),
            "--episodes", "8", "--eval-episodes", str(EVAL_EPISODES), "--runs-dir", str(runs_dir), "--no-progress",
            *sets, *extra]


def run_quietly(options: AblateOptions):
    """Run a suite in-process; return its result and what it printed to stderr."""
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        result = run_ablation(options)
    return result, printed.getvalue()


def assert_not_blank(path: Path) -> None:
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.std() > 0 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10, path


def modified_times(suite_dir: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in suite_dir.rglob("*")
            if p.name in {"heads.safetensors", "results.json", "metrics.jsonl"}}


@pytest.fixture(scope="module")
def components(synthetic_cache, tmp_path_factory):
    """The components suite (Table 3) at K = 1 and 3 on the session's synthetic cache."""
    options = suite_options(synthetic_cache, tmp_path_factory.mktemp("runs"), "components")
    result, printed = run_quietly(options)
    return options, result, printed


def test_shipped_suites_are_valid_and_every_variant_resolves():
    assert {"components", "fusion", "consistency", "templates", "baselines"} <= set(shipped_suites())
    for name in shipped_suites():
        suite = load_suite(name)
        settings = SuiteSettings(dataset="synthetic", backbone="clipspm-tiny-vit", cache="unused", shots=[1],
                                 overrides=[*suite.overrides], eval_episodes=10, eval_queries=1, eval_seed=0)
        for variant in suite.variants:
            variant_config(settings, variant, 1)   # unknown keys or bad values would raise
    components = load_suite("components")
    on_off = {tuple(v.columns.values()) for v in components.variants}
    assert len(on_off) == 8 and components.reference == "full"
    assert [v.name for v in load_suite("templates").variants] == ["R1", "R4", "R7", "R10", "R13", "R16"]


def test_consistency_suite_builds_its_rows_in_the_paper_profile_that_has_the_terms():
    """Under the default profile (official: L_S weighted 0) Table 5's rows would be one model."""
    assert resolve_config("heads", "synthetic").model.profile == "official"
    suite = load_suite("consistency")
    assert suite.overrides == ("model.profile=paper",) and "model.profile=paper" in suite.note
    settings = SuiteSettings(dataset="synthetic", backbone="clipspm-tiny-vit", cache="unused", shots=[1],
                             overrides=[*suite.overrides], eval_episodes=10, eval_queries=1, eval_seed=0)
    configs = {variant.name: variant_config(settings, variant, 1) for variant in suite.variants}
    assert {cfg.model.profile for cfg in configs.values()} == {"paper"}
    assert {name: (cfg.model.support_consistency, cfg.model.query_consistency) for name, cfg in configs.items()} \
        == {"none": (False, False), "support": (True, False), "query": (False, True), "both": (True, True)}
    assert configs["both"].loss.lambda_s > 0


def test_paper_numbers_are_those_of_the_paper():
    settings = SuiteSettings(dataset="hmdb51", backbone="RN50", cache="", shots=[1, 3, 5], overrides=[],
                             eval_episodes=1, eval_queries=1, eval_seed=0)
    table3 = paper_numbers(load_suite("components"), settings)
    assert {name: table3[name][1] for name in ("none", "hsmr", "spm", "padm", "full")} == \
        {"none": 64.5, "hsmr": 64.3, "spm": 74.0, "padm": 68.4, "full": 77.4}    # SPEC section 5
    templates = paper_numbers(load_suite("templates"), settings)
    assert templates["R1"] == {1: 76.1} and templates["R16"] == {1: 77.4, 3: 82.6, 5: 84.5}  # Fig. 5 + Table 1


def test_the_comparison_table_takes_each_methods_row_of_tables_1_and_2():
    settings = SuiteSettings(dataset="hmdb51", backbone="RN50", cache="", shots=[1, 3, 5], overrides=[],
                             eval_episodes=1, eval_queries=1, eval_seed=0)
    table1 = paper_numbers(load_suite("baselines"), settings)
    assert table1["clipfsar"] == {1: 69.2, 3: 77.6, 5: 80.3} and table1["sten"] == {1: 59.1, 5: 78.1}
    assert table1["cpm2c"][1] == 66.3 and table1["clipmei"] == {1: 76.4, 3: 83.0, 5: 84.9}
    assert table1["clipspm"] == {1: 77.4, 3: 82.6, 5: 84.5} and table1["otam"][1] == 64.5    # Table 3, no component
    assert "trx" not in table1 and "hyrsm" not in table1     # printed for INet-RN50 only: not this backbone
    vit = paper_numbers(load_suite("baselines"), SuiteSettings(**{**settings.__dict__, "backbone": "ViT-B-16",
                                                                   "dataset": "kinetics100"}))
    assert vit["clipmei"] == {1: 87.7, 3: 95.3, 5: 96.0} and vit["sten"] == {1: 83.0, 5: 91.4}


def test_the_baselines_suite_trains_and_scores_every_method_from_one_cache(synthetic_cache, tmp_path):
    """Every registered method that runs from a feature cache (with what the stages load beside it) is a row;
    each is scored on the same episodes."""
    from clipspm.pipeline.methods import methods
    from clipspm.pipeline.methods.registry import STAGE_INPUTS

    suite = load_suite("baselines")
    from_cache = {name for name, m in methods().items() if not m.missing_inputs(set(STAGE_INPUTS))}
    assert {variant.name for variant in suite.variants} == from_cache
    result, _ = run_quietly(suite_options(synthetic_cache, tmp_path / "runs", "baselines", shots=(1,)))
    assert not result.report.missing
    report = result.report.markdown.read_text()
    for variant in suite.variants:
        row = next(line for line in report.splitlines() if line.startswith(f"| {variant.label} |"))
        assert variant.columns["venue"] in row and "± " in row, row
    episodes = {json.loads((p.parent / "results.json").read_text())["episodes_sha256"]
                for p in (tmp_path / "runs").rglob("results.json")}
    assert len(episodes) == 1


def test_suite_files_are_checked_with_clear_errors():
    good = {"reference": "a", "variants": [{"name": "a", "set": ["model.padm=false"]}]}
    parse_suite(good, default_name="mine", source="mine.yaml")
    with pytest.raises(ClipspmError, match="reference"):
        parse_suite({**good, "reference": "b"}, default_name="mine", source="mine.yaml")
    with pytest.raises(ClipspmError, match="unknown suite keys"):
        parse_suite({**good, "variant": []}, default_name="mine", source="mine.yaml")
    with pytest.raises(ClipspmError, match="key=value"):
        parse_suite({**good, "variants": [{"name": "a", "set": ["model.padm"]}]}, default_name="m", source="m.yaml")
    with pytest.raises(ClipspmError, match="no shipped suite"):
        load_suite("componentz")
    with pytest.raises(ClipspmError, match=r"mine.yaml: `set` must be a list of key=value"):
        parse_suite({**good, "set": "model.profile=paper"}, default_name="mine", source="mine.yaml")
    shared = parse_suite({**good, "set": ["model.profile=paper"], "note": "why"}, default_name="m", source="m.yaml")
    assert parse_suite(shared.as_dict(), default_name="m", source="suite.yaml") == shared, "suite.yaml round trip"


def test_suite_on_one_cache_makes_every_row_and_figure(components, synthetic_cache):
    _, result, printed = components
    suite = load_suite("components")
    assert "reusing cache" in printed
    assert [(o.variant, o.shots) for o in result.outcomes] == [(v.name, k) for v in suite.variants for k in (1, 3)]
    # every component off is the OTAM baseline: nothing to train, only scored
    assert {o.variant: o.status for o in result.outcomes if o.status != "trained"} == {"none": "no training"}
    caches, episodes = set(), {1: set(), 3: set()}
    for outcome in result.outcomes:
        caches.add(OmegaConf.load(Path(outcome.run_dir) / "config.yaml").data.cache)
        scored = json.loads((Path(outcome.run_dir) / "results.json").read_text())
        episodes[outcome.shots].add(scored["episodes_sha256"])
    assert caches == {str(synthetic_cache.resolve())}, "every variant trains from the one cache"
    assert all(len(digests) == 1 for digests in episodes.values()), "every variant is scored on the same episodes"

    markdown = result.report.markdown.read_text()
    for variant in suite.variants:
        marks = " | ".join("✓" if variant.columns[c] else "✗" for c in suite.columns)
        assert markdown.count(f"| {variant.label} | {marks} |") == 2, variant   # accuracy and paired tables
    assert markdown.startswith("# Component analysis (Table 3): synthetic, clipspm-tiny-vit, heads stage")
    assert "Heads stage: each run trained its heads on the frozen CLIP features" in markdown
    assert "Each run's checkpoint was chosen on the val split." in markdown
    with open(result.report.csv) as handle:
        rows = list(csv.DictReader(handle))
    assert [row["variant"] for row in rows] == [v.name for v in suite.variants]
    assert all(0 <= float(row[f"{k}shot_accuracy"]) <= 100 for row in rows for k in (1, 3) if row["variant"] != "hsmr")
    assert {(row["stage"], row["select_on"]) for row in rows} == {("heads", "val")}
    names = {path.name for path in result.report.figures}
    assert names == {"training_curves.png", "ablation_bars.png", "embedding_tsne.png"}
    for path in result.report.figures:
        assert_not_blank(path)
    assert not result.report.missing


def test_heads_stage_row_whose_training_cannot_reach_the_logits_is_marked_not_printed(components):
    """HSMR alone trains only its own parameters for L_H; none of them feed the distance, so in the heads stage
    the row is the untrained OTAM baseline, episode by episode. The report says so instead of a number."""
    _, result, _ = components
    suite_dir = result.suite_dir

    def per_episode(run: str) -> np.ndarray:
        digest = json.loads((suite_dir / run / "results.json").read_text())["episodes_sha256"]
        return np.load(suite_dir / run / f"episode_accuracy-{digest[:12]}.npy")

    for k in (1, 3):
        assert np.array_equal(per_episode(f"hsmr-{k}shot"), per_episode(f"none-{k}shot")), "what the mark claims"
    assert set(result.report.not_results) == {("hsmr", 1), ("hsmr", 3)}
    markdown = result.report.markdown.read_text()
    assert markdown.count("| HSMR | ✓ | ✗ | ✗ | not a result † | not a result † |") == 2   # both tables
    assert ("- † HSMR: no trained parameter reaches the logits (those of hsmr feed only auxiliary losses), so "
            "training cannot change a score: the row is the untrained model.") in markdown
    assert "- HSMR + PADM: the parameters of hsmr train but do not reach the logits" in markdown
    with open(result.report.csv) as handle:
        rows = {row["variant"]: row for row in csv.DictReader(handle)}
    assert rows["hsmr"]["1shot_accuracy"] == rows["hsmr"]["3shot_difference"] == ""
    assert rows["hsmr"]["not_a_result"].startswith("no trained parameter reaches the logits")
    assert rows["hsmr-padm"]["not_a_result"] == "" and rows["hsmr-padm"]["1shot_accuracy"] != ""


def test_second_run_reuses_the_cache_and_the_finished_variants(components):
    options, first, _ = components
    before = modified_times(first.suite_dir)
    again, printed = run_quietly(options)
    assert "reusing cache" in printed
    assert {o.status for o in again.outcomes} == {"reused"}
    assert [o.accuracy for o in again.outcomes] == [o.accuracy for o in first.outcomes]
    assert modified_times(first.suite_dir) == before, "nothing was trained or evaluated again"


def test_report_pairs_each_variant_with_the_full_model_as_computed_by_hand(components, tmp_path):
    _, result, _ = components
    suite_dir = result.suite_dir

    def per_episode(run: str) -> np.ndarray:
        digest = json.loads((suite_dir / run / "results.json").read_text())["episodes_sha256"]
        return np.load(suite_dir / run / f"episode_accuracy-{digest[:12]}.npy").astype(np.float64)

    (suite_dir / "report.md").unlink()
    reported = run_cli("report", str(suite_dir), "--device", "cpu", cwd=tmp_path)
    assert reported.returncode == 0, reported.stderr[-2000:]
    markdown = (suite_dir / "report.md").read_text()
    with open(suite_dir / "report.csv") as handle:
        rows = {row["variant"]: row for row in csv.DictReader(handle)}
    for variant in ("none", "padm", "spm-padm"):
        for k in (1, 3):
            difference = per_episode(f"{variant}-{k}shot") - per_episode(f"full-{k}shot")
            mean = 100 * difference.mean()
            ci = 100 * 1.96 * difference.std(ddof=1) / np.sqrt(difference.size)
            assert float(rows[variant][f"{k}shot_difference"]) == pytest.approx(mean)
            assert float(rows[variant][f"{k}shot_difference_ci95"]) == pytest.approx(ci)
            assert f"{mean:+.2f} ± {ci:.2f}" in markdown
    assert rows["full"]["1shot_difference"] == ""


def test_user_written_suite_file_runs_without_code_in_parallel_workers(synthetic_cache, tmp_path):
    suite_file = tmp_path / "otam_temperature.yaml"
    suite_file.write_text(OTAM_SUITE_YAML)
    done = run_cli("ablate", "--suite", str(suite_file), "--shots", "1", "--parallel", "2", "--devices", "cpu,cpu",
                   *cli_options(synthetic_cache, tmp_path / "runs"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    suite_dir = tmp_path / "runs" / "ablate-synthetic-clipspm-tiny-vit-otam_temperature"
    assert "1-shot on cpu: no training" in done.stderr, "each run went to a worker on a CPU device"
    for name, value in (("lam0.1", 0.1), ("lam0.5", 0.5)):
        assert f"otam_lambda: {value}" in (suite_dir / f"{name}-1shot" / "config.yaml").read_text()
        assert (suite_dir / f"{name}-1shot" / "results.json").exists()
    markdown = (suite_dir / "report.md").read_text()
    assert "| lam0.1 | 0.1 |" in markdown and "| lam0.5 | 0.5 | reference |" in markdown
    assert_not_blank(suite_dir / "figures" / "accuracy_vs_lambda.png")


def test_killed_suite_resumes_skipping_finished_variants(synthetic_cache, tmp_path):
    runs = tmp_path / "runs"
    longer = ("--set", "train.val_every=4", "--episodes", "16")    # four checkpoints per run: a kill lands mid-run
    suite_dir = runs / "ablate-synthetic-clipspm-tiny-vit-consistency"
    first, second = suite_dir / "none-1shot", suite_dir / "support-1shot"
    kill_when_written(["ablate", "--suite", "consistency", "--shots", "1", *cli_options(synthetic_cache, runs), *longer],
                      second / "checkpoints" / "last" / "state.json", cwd=tmp_path, env={"PYTHONUNBUFFERED": "1"})
    assert (first / "results.json").exists() and not (second / "results.json").exists(), "kill mid-suite"
    finished_before = modified_times(first)

    result, _ = run_quietly(suite_options(synthetic_cache, runs, "consistency", shots=(1,), episodes=16,
                                          overrides=(*SHORT, "train.val_every=4")))
    status = {o.variant: o.status for o in result.outcomes}
    assert status == {"none": "reused", "support": "resumed", "query": "trained", "both": "trained"}
    assert modified_times(first) == finished_before
    last_validation = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()][-1]
    assert last_validation == {"episode": 16, "val_acc": last_validation["val_acc"]}
    assert not result.report.missing


def test_a_failing_variant_does_not_stop_the_others_and_a_rerun_finishes_it(synthetic_cache, tmp_path,
                                                                             monkeypatch):
    import clipspm.experiments.ablate as ablate

    def train_or_fail(cfg, run_dir, **kwargs):
        if run_dir.name == "support-1shot":
            raise ClipspmError("the disk filled up")
        return train_heads(cfg, run_dir, **kwargs)

    train_heads = ablate.train_heads
    options = suite_options(synthetic_cache, tmp_path / "runs", "consistency", shots=(1,))
    monkeypatch.setattr(ablate, "train_heads", train_or_fail)
    with pytest.raises(ClipspmError, match=r"1 of 4 runs did not finish(.|\n)*support 1-shot: the disk filled up"):
        run_quietly(options)
    suite_dir = tmp_path / "runs" / "ablate-synthetic-clipspm-tiny-vit-consistency"
    assert {p.parent.name for p in suite_dir.glob("*/results.json")} == {"none-1shot", "query-1shot", "both-1shot"}

    monkeypatch.setattr(ablate, "train_heads", train_heads)
    result, _ = run_quietly(options)
    assert {o.variant: o.status for o in result.outcomes} == {"none": "reused", "support": "trained",
                                                              "query": "reused", "both": "reused"}
    assert not result.report.missing
    # the suite's own `set` reached every run, and the report says why
    assert {OmegaConf.load(path).model.profile for path in suite_dir.glob("*/config.yaml")} == {"paper"}
    markdown = result.report.markdown.read_text()
    assert "Method profile (`model.profile`): `paper` for every variant." in markdown
    assert load_suite("consistency").note in markdown


def test_cli_help_explains_every_option():
    shown = CliRunner().invoke(app, ["ablate", "--help"], terminal_width=200).output
    for option in ("--suite", "--stage", "--select-on", "--dataset", "--root", "--backbone", "--pretrained", "--shots",
                   "--episodes",
                   "--eval-episodes", "--eval-queries", "--set", "--parallel", "--devices", "--cache-dir",
                   "--runs-dir"):
        assert option in shown, option
    assert "Suite directory made by" in CliRunner().invoke(app, ["report", "--help"]).output


def test_the_config_reference_in_docs_is_the_schema_of_today(tmp_path):
    """docs/CONFIG.md is what `clipspm config --markdown` prints: regenerate it after changing an option.
    A fresh process, so methods other tests register are not listed."""
    committed = (Path(__file__).parents[1] / "docs" / "CONFIG.md").read_text()
    printed = run_cli("config", "--markdown", cwd=tmp_path, env={"CLIPSPM_METHODS": ""})
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert committed == printed.stdout, "docs/CONFIG.md is stale: run `clipspm config --markdown > docs/CONFIG.md`"
