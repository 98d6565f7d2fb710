"""Ablation suites trained end to end (`clipspm ablate --stage finetune`), as the paper's Table 3 rows were,
and the rows that cannot be results: those in which nothing that trains reaches the logits.

Tiny random-weight ViT on the `video_root` custom dataset (10 videos per split), 2-way 1-shot episodes
with one query, one or a few optimiser steps per variant: every run is a few seconds on a laptop CPU.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from torch import nn

from clipspm.cache.store import FeatureCache, find_store
from clipspm.config import resolve_config
from clipspm.experiments.ablate import AblateOptions, run_ablation, worker_cores
from clipspm.experiments.reach import config_reach, logit_reach
from clipspm.experiments.report import variant_reach
from clipspm.experiments.suites import SuiteSettings, load_suite, shipped_suites, variant_config
from clipspm.pipeline.episode import Episode, HeadOutput, class_prototypes
from clipspm.pipeline.methods import methods
from clipspm.pipeline.methods.registry import STAGE_INPUTS
from clipspm.pipeline.otam import otam_distance
from clipspm.stages.extract import ExtractOptions, extract
from clipspm.stages.runs import head_inputs
from tests.conftest import kill_when_written, run_cli

VIT = "clipspm-tiny-vit"
SHORT = ("train.ways=2", "train.queries=1", "train.val_queries=1", "train.episodes_per_step=2", "train.val_every=2",
         "train.val_episodes=10", "train.log_every=2", "finetune.workers=0", "data.train_views=0")
EVAL_EPISODES = 20


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache_dir(video_root, tmp_path_factory) -> Path:
    """The tiny ViT's cache of the custom dataset: what the suites find by address and train from."""
    root = tmp_path_factory.mktemp("ablate-finetune-caches")
    extract(ExtractOptions(dataset="custom", root=video_root, backbone=VIT, pretrained="none", train_views=0,
                           cache_root=root, workers=0, progress=False))
    return root


def components_subset(path: Path, names: list[str]) -> Path:
    """A suite file holding some rows of the shipped components suite (Table 3), unchanged."""
    data = load_suite("components").as_dict()
    data["variants"] = [variant for variant in data["variants"] if variant["name"] in names]
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def finetune_options(video_root: Path, cache_dir: Path, runs_dir: Path, suite: Path, **changes) -> AblateOptions:
    defaults = {"suite": str(suite), "dataset": "custom", "stage": "finetune", "root": video_root, "backbone": VIT,
                "pretrained": "none", "cache_dir": cache_dir, "shots": (1,), "episodes": 2,
                "eval_episodes": EVAL_EPISODES, "overrides": SHORT, "devices": ("cpu",), "runs_dir": runs_dir,
                "progress": False}
    return AblateOptions(**{**defaults, **changes})


def cli_options(video_root: Path, cache_dir: Path, runs_dir: Path, suite: Path, *extra: str) -> list[str]:
    sets = [item for override in SHORT for item in ("--set", override)]
    return ["ablate", "--stage", "finetune", "--suite", str(suite), "--shots", "1", "--dataset", "custom", "--root",
            str(video_root), "--backbone", VIT, "--pretrained", "none", "--cache-dir", str(cache_dir),
            "--eval-episodes", str(EVAL_EPISODES), "--runs-dir", str(runs_dir), "--no-progress", *sets, *extra]


def modified_times(run_dir: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in run_dir.rglob("*")
            if p.name in {"heads.safetensors", "visual.safetensors", "results.json", "metrics.jsonl"}}


@pytest.fixture(scope="module")
def finetuned_suite(video_root, cache_dir, tmp_path_factory):
    """Three rows of Table 3 trained end to end: the baseline, HSMR alone and the full model."""
    work = tmp_path_factory.mktemp("finetune-suite")
    suite = components_subset(work / "table3.yaml", ["none", "hsmr", "full"])
    printed = io.StringIO()
    with contextlib.redirect_stderr(printed):
        result = run_ablation(finetune_options(video_root, cache_dir, work / "runs", suite))
    return result, printed.getvalue()


def test_shipped_components_suite_resolves_every_variant_for_the_finetune_stage():
    settings = SuiteSettings(dataset="hmdb51", backbone="RN50", cache="unused", shots=[1, 3, 5], overrides=[],
                             eval_episodes=10000, eval_queries=1, eval_seed=0, stage="finetune")
    suite = load_suite("components")
    for variant in suite.variants:
        for k in settings.shots:
            cfg = variant_config(settings, variant, k)
            assert cfg.finetune.unfreeze == "all" and cfg.train.shots == k
            assert cfg.train.lr == 1.0e-5 and cfg.train.select_on == "val"   # the paper's one lr end to end
            assert [cfg.model[part] for part in ("hsmr", "spm", "padm")] == list(variant.columns.values())


def test_finetune_suite_trains_every_row_end_to_end_on_one_set_of_episodes(finetuned_suite, cache_dir):
    result, printed = finetuned_suite
    assert "reusing cache" in printed and result.suite_dir.name.endswith("-components-ft")
    assert [(o.variant, o.status) for o in result.outcomes] == [("none", "trained"), ("hsmr", "trained"),
                                                                ("full", "trained")], "the tower trains in every row"
    training_cache = {OmegaConf.load(Path(o.run_dir) / "config.yaml").data.cache for o in result.outcomes}
    assert len(training_cache) == 1
    scored = [json.loads((Path(o.run_dir) / "results.json").read_text()) for o in result.outcomes]
    for outcome in result.outcomes:
        assert (Path(outcome.run_dir) / "checkpoints" / "best" / "visual.safetensors").is_file()
    test_caches = {entry["cache"] for entry in scored}
    assert len(test_caches) == 3 and not test_caches & training_cache, "each run scored through its tuned tower"
    assert {entry["episodes_file"] for entry in scored} == \
        {str(Path(next(iter(training_cache))) / "episodes" / f"test-2way-1shot-1query-{EVAL_EPISODES}ep-seed0"
                                                             ".safetensors")}
    assert len({entry["episodes_sha256"] for entry in scored}) == 1, "every row scored on the same stored episodes"
    assert {entry["select_on"] for entry in scored} == {"val"}

    markdown = result.report.markdown.read_text()
    assert markdown.startswith("# Component analysis (Table 3): custom, clipspm-tiny-vit, finetune stage")
    assert "Finetune stage: each run trained its heads and the CLIP visual tower end to end" in markdown
    assert "not a result" not in markdown and not result.report.not_results, "the tower trains: HSMR is a result"
    assert markdown.count("| HSMR | ✓ | ✗ | ✗ | ") == 2
    with open(result.report.csv) as handle:
        rows = {row["variant"]: row for row in csv.DictReader(handle)}
    assert {row["stage"] for row in rows.values()} == {"finetune"}
    assert all(0 <= float(row["1shot_accuracy"]) <= 100 for row in rows.values())
    assert rows["hsmr"]["1shot_difference"] != "" and rows["full"]["1shot_difference"] == ""
    assert not result.report.missing


def test_finetune_workers_share_the_cores_evenly_as_each_decodes_its_frames():
    assert worker_cores(["cuda:0", "cuda:1"], "finetune", cores=16) == [8, 8]
    assert worker_cores(["cpu", "cpu", "cuda:0"], "finetune", cores=7) == [2, 2, 2]
    # heads stage (the thread policy): CPU workers split what the GPU workers leave, GPU workers keep the default
    assert worker_cores(["cuda:0", "cuda:1"], "heads", cores=16) == [None, None]
    assert worker_cores(["cpu", "cpu", "cuda:0"], "heads", cores=7) == [3, 3, None]


def test_killed_finetune_suite_resumes_in_parallel_workers_skipping_finished_variants(video_root, cache_dir,
                                                                                      tmp_path):
    suite = components_subset(tmp_path / "two.yaml", ["none", "full"])
    runs = tmp_path / "runs"
    args = cli_options(video_root, cache_dir, runs, suite, "--episodes", "8")   # four checkpoints per run
    suite_dir = runs / "ablate-custom-clipspm-tiny-vit-components-ft"
    first, second = suite_dir / "none-1shot", suite_dir / "full-1shot"
    kill_when_written(args, second / "checkpoints" / "last" / "state.json", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert (first / "results.json").exists() and not (second / "results.json").exists(), "kill mid-suite"
    finished_before = modified_times(first)

    done = run_cli(*args, "--parallel", "2", "--devices", "cpu,cpu", cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CLIP features + OTAM, 1-shot on cpu: reused" in done.stderr
    assert "CLIP-SPM (all three), 1-shot on cpu: resumed" in done.stderr, "continued in a worker process"
    assert modified_times(first) == finished_before
    validations = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()
                   if "val_acc" in line]
    assert [record["episode"] for record in validations] == [2, 4, 6, 8], "each validation written once"
    assert (second / "results.json").exists() and "Not scored yet" not in (suite_dir / "report.md").read_text()


class AuxOnlyHead(nn.Module):
    """OTAM on the episode's features, plus a parameter that only an auxiliary loss uses (like HSMR alone)."""

    def __init__(self, dim: int, scaled: bool):
        super().__init__()
        self.aux_only = nn.Linear(dim, dim)
        self.scale = nn.Parameter(torch.ones(())) if scaled else None

    def forward(self, episode: Episode) -> HeadOutput:
        distance = otam_distance(episode.query, class_prototypes(episode.support, episode.shots), 0.5, True)
        if self.scale is not None:
            distance = self.scale * distance
        aux = {"extra": self.aux_only(episode.support).pow(2).mean()} if self.training else {}
        return HeadOutput(logits=-distance, aux=aux)


def toy_episode(dim: int = 8) -> Episode:
    return Episode(support=torch.randn(1, 2, 3, dim), query=torch.randn(1, 2, 3, dim),
                   query_labels=torch.tensor([[0, 1]]), class_text=torch.randn(1, 2, dim),
                   class_ids=torch.tensor([[0, 1]]), shots=1)


def test_parameters_that_feed_only_auxiliary_losses_cannot_change_a_score():
    fixed = logit_reach(AuxOnlyHead(8, scaled=False), toy_episode(), features_trained=False)
    assert fixed.scores_fixed and fixed.idle_modules == ("aux_only",)
    assert "those of aux_only feed only auxiliary losses" in fixed.reason()

    partly = logit_reach(AuxOnlyHead(8, scaled=True), toy_episode(), features_trained=False)
    assert not partly.scores_fixed and partly.reason() is None
    assert partly.reaching == ("scale",) and partly.idle_modules == ("aux_only",)

    tuned = logit_reach(AuxOnlyHead(8, scaled=False), toy_episode(), features_trained=True)
    assert not tuned.scores_fixed and tuned.reaching == ("features",), "a trained tower makes the features"

    frozen = AuxOnlyHead(8, scaled=True).requires_grad_(False)
    assert logit_reach(frozen, toy_episode(), features_trained=False).trained == (), "nothing trains: not marked"


@pytest.mark.parametrize("stage", ["heads", "finetune"])
def test_only_hsmr_alone_in_the_heads_stage_is_marked_among_the_shipped_suites(stage, synthetic_cache):
    """The mark is computed from each head, for every shipped suite and method: only HSMR without SPM has
    trained parameters (its own) none of which reaches the distance; the tower makes that a result again.
    A method that needs the text tower (MCDP-FSAR) gets the one of the suite's cache, as the report does."""
    marked = set()
    for name in shipped_suites():
        suite = load_suite(name)
        settings = SuiteSettings(dataset="synthetic", backbone=VIT, cache=str(synthetic_cache), shots=[1],
                                 overrides=[*suite.overrides], eval_episodes=10, eval_queries=1, eval_seed=0,
                                 stage=stage)
        marked |= {(name, variant.name) for variant in suite.variants
                   if variant_reach(settings, variant, 1, dim=64, frames=8).scores_fixed}
    assert marked == ({("components", "hsmr")} if stage == "heads" else set())


def test_every_registered_method_that_trains_can_change_its_scores(synthetic_cache):
    """At its default options, no method usable from a cache (with what the stages load beside it) trains
    only parameters that miss its logits."""
    with FeatureCache(find_store(synthetic_cache)) as cache:
        for name, method in methods().items():
            if method.refusal(set(STAGE_INPUTS)) is None:
                cfg = resolve_config("heads", "synthetic", overrides=[f"model.kind={name}"])
                inputs = head_inputs(cfg, cache, torch.device("cpu")) if method.stage_inputs else None
                reach = config_reach(cfg, dim=64, frames=8, stage="heads", inputs=inputs)
                assert not reach.scores_fixed, name
                assert bool(reach.reaching) == method.trainable, name
