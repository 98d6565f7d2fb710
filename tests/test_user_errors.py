"""A user's mistake gets one message that names it, never a traceback: every command, fed bad values.

Each case runs `clipspm ARGS` through `clipspm.cli.main` in this process (what a user's command runs, minus the
interpreter start) and expects exit 2 (bad input; 1 where the job ran and part of it failed), a message that
matches, and no exception escaping. `test_the_installed_command_prints_no_traceback` runs some of them as
real processes. Refused training starts are also checked to write nothing: no run directory, no episode file.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from clipspm.cli import main
from clipspm.errors import ClipspmError
from clipspm.pipeline.encoder import load_clip
from clipspm.stages.evaluate import evaluate_run
from clipspm.stages.heads import train_heads
from clipspm.stages.runs import CONFIG_NAME
from tests.conftest import TINY_MODEL, heads_config, run_cli

SHORT = ("train.episodes=32", "train.val_every=32", "train.val_episodes=20", "train.log_every=16")


def damage(path: Path) -> None:
    """A safetensors file whose header claims a terabyte: SafetensorError 'header too large'."""
    path.write_bytes(struct.pack("<Q", 10 ** 12) + b"x" * 64)


@pytest.fixture(scope="module")
def world(synthetic_cache, tmp_path_factory) -> dict[str, str]:
    """Paths the cases name: a cache, evaluated runs, damaged files and directories of the wrong kind."""
    root = tmp_path_factory.mktemp("user-errors")
    run = root / "run"
    train_heads(heads_config(synthetic_cache, *SHORT), run, progress=False)
    broken = root / "broken"
    shutil.copytree(run, broken)
    for checkpoint in ("best", "last"):
        damage(broken / "checkpoints" / checkpoint / "heads.safetensors")
    evaluate_run(run, episodes=40, progress=False)
    other = root / "other"
    shutil.copytree(run, other)
    evaluate_run(other, episodes=30, progress=False)
    damaged_results = root / "damaged-results"
    shutil.copytree(run, damaged_results)
    (damaged_results / "results.json").write_text("{not json")
    damaged_config = root / "damaged-config"
    shutil.copytree(run, damaged_config)
    (damaged_config / CONFIG_NAME).write_text("data: [unclosed\n")

    rng = np.random.default_rng(0)
    (root / "random.pt").write_bytes(rng.bytes(5000))
    (root / "random.safetensors").write_bytes(rng.bytes(5000))
    torch.save(load_clip(TINY_MODEL, "none").model.state_dict(), root / "protocol4.pt", pickle_protocol=4)
    (root / "bad.yaml").write_text("variants: [\n  - name: a\n")
    (root / "no-variants.yaml").write_text("title: x\nvariants: []\n")
    (root / "a-file").write_text("not a directory\n")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("mine\n")
    (root / "damaged-suite").mkdir()
    (root / "damaged-suite" / "suite.yaml").write_text("suite: [\n")
    (root / "damaged-cache" / "features.zarr").mkdir(parents=True)
    (root / "damaged-cache" / "features.zarr" / "zarr.json").write_text("garbage{")
    with open(synthetic_cache / "features.zarr" / "zarr.json") as handle:
        dataset_root = json.load(handle)["attributes"]["clipspm"]["dataset_root"]
    return {"cache": str(synthetic_cache), "run": str(run), "broken": str(broken), "other": str(other),
            "damaged_results": str(damaged_results), "damaged_config": str(damaged_config),
            "missing": str(root / "missing"), "root": dataset_root,
            **{name.replace("-", "_").replace(".", "_"): str(root / name) for name in
               ("random.pt", "random.safetensors", "protocol4.pt", "bad.yaml", "no-variants.yaml", "a-file",
                "notes", "damaged-suite", "damaged-cache")}}


TRAIN = ("train", "--cache", "{cache}", "--no-progress", "--device", "cpu")
EXTRACT = ("extract", "--dataset", "synthetic", "--root", "{root}", "--backbone", TINY_MODEL, "--cache-dir",
           "{missing}", "--no-progress", "--workers", "0")

# (case, arguments, exit status, what the message must say)
CASES = [
    # train: options, config values, files, run directories, caches, checkpoints
    ("train --shots 0", (*TRAIN, "--run-dir", "{new}", "--shots", "0"), 2, r"train\.shots=0 is not valid.*>= 1"),
    ("train --shots -1", (*TRAIN, "--run-dir", "{new}", "--shots", "-1"), 2, r"train\.shots=-1 is not valid"),
    ("train --shots 100", (*TRAIN, "--run-dir", "{new}", "--shots", "100"), 2,
     r"100-shot episodes with 4 queries per class need 5 classes with at least 104 videos each; the train split"),
    ("train val split too small", (*TRAIN, "--run-dir", "{new}", "--set", "train.val_queries=20"), 2,
     r"with 20 queries per class .* the val split has 0 such classes"),
    ("train train.lr=abc", (*TRAIN, "--run-dir", "{new}", "--set", "train.lr=abc"), 2,
     r"train\.lr='abc' is not valid: it expects a number > 0"),
    ("train unknown key", (*TRAIN, "--run-dir", "{new}", "--set", "train.lrr=1"), 2, r"did you mean train\.lr\?"),
    ("train --set without =", (*TRAIN, "--run-dir", "{new}", "--set", "train.lr"), 2, r"--set expects key=value"),
    ("train unknown method", (*TRAIN, "--run-dir", "{new}", "--set", "model.kind=nope"), 2,
     r"unknown model\.kind 'nope'"),
    ("train unknown dataset", ("train", "--dataset", "nope", "--run-dir", "{new}"), 2, r"unknown dataset 'nope'"),
    ("train --device nonsense", ("train", "--cache", "{cache}", "--run-dir", "{new}", "--device", "nonsense"), 2,
     r"--device 'nonsense' is not a device name"),
    ("train --device cuda:99", ("train", "--cache", "{cache}", "--run-dir", "{new}", "--device", "cuda:99"), 2,
     r"--device cuda:99: .*CUDA device"),
    ("train damaged --config", (*TRAIN, "--run-dir", "{new}", "--config", "{bad_yaml}"), 2, r"is not valid YAML"),
    ("train missing --config", (*TRAIN, "--run-dir", "{new}", "--config", "{missing}.yaml"), 2, r"does not exist"),
    ("train into a run", (*TRAIN, "--run-dir", "{run}"), 2, r"already holds a run; pass --resume"),
    ("train finetune into a heads run", (*TRAIN, "--stage", "finetune", "--resume", "--run-dir", "{run}"), 2,
     r"holds a heads run, not a finetune run"),
    ("train --run-dir a file", (*TRAIN, "--run-dir", "{a_file}"), 2, r"is a file; pass a directory"),
    ("train --run-dir not a run", (*TRAIN, "--run-dir", "{notes}"), 2, r"is not empty and holds no run"),
    ("train --cache not a cache", ("train", "--cache", "{run}", "--run-dir", "{new}"), 2, r"no feature cache at"),
    ("train --init missing", (*TRAIN, "--stage", "finetune", "--run-dir", "{new}", "--init", "{missing}"), 2,
     r"is not a run directory"),
    ("train --init damaged checkpoint", (*TRAIN, "--stage", "finetune", "--run-dir", "{new}", "--init", "{broken}",
                                         "--set", "finetune.workers=0"), 2,
     r"heads\.safetensors is not a readable safetensors file \(Error while deserializing header: header too large\)"),
    ("train typer bad option", ("train", "--bogus"), 2, r"No such option"),
    ("train typer bad int", ("train", "--shots", "abc"), 2, r"Invalid value for '--shots'"),
    # extract: weight files, devices, names
    ("extract --pretrained random .pt", (*EXTRACT, "--pretrained", "{random_pt}"), 2,
     r"weight file .*random\.pt is not a weights-only PyTorch file"),
    ("extract --pretrained random .safetensors", (*EXTRACT, "--pretrained", "{random_safetensors}"), 2,
     r"random\.safetensors is not a readable safetensors file"),
    ("extract --pretrained pickle protocol 4", (*EXTRACT, "--pretrained", "{protocol4_pt}"), 2,
     r"was pickled with protocol 4.*save it again"),
    ("extract --pretrained missing file", (*EXTRACT, "--pretrained", "{missing}.pt"), 2, r"does not exist"),
    ("extract --weights damaged", (*EXTRACT, "--pretrained", "none", "--weights", "{random_safetensors}"), 2,
     r"visual tower weights .* is not a readable safetensors file"),
    ("extract --weights heads run", (*EXTRACT, "--pretrained", "none", "--weights", "{run}"), 2,
     r"holds no fine-tuned visual tower"),
    ("extract --device foo", (*EXTRACT, "--pretrained", "none", "--device", "foo"), 2, r"--device 'foo'"),
    ("extract unknown backbone", ("extract", "--backbone", "nope", "--cache-dir", "{missing}"), 2,
     r"unknown open_clip model 'nope'"),
    ("extract missing root", ("extract", "--dataset", "ucf101", "--root", "{missing}"), 2, r"does not exist"),
    ("extract unknown format", (*EXTRACT, "--format", "parquet"), 2, r"unknown cache format 'parquet'"),
    ("extract unknown --sampling", (*EXTRACT, "--sampling", "random"), 2, r"--sampling random: use one of tsn, released"),
    ("extract unknown --normalize", (*EXTRACT, "--normalize", "imagenet"), 2, r"--normalize imagenet: use one of clip, none"),
    ("extract unknown --class-names", (*EXTRACT, "--class-names", "mine"), 2,
     r"--class-names mine: use one of benchmark, released"),
    ("extract unknown split", (*EXTRACT, "--splits", "train,foo"), 2, r"splits must be"),
    # cache info / verify
    ("cache info missing", ("cache", "info", "{missing}"), 2, r"no feature cache at"),
    ("cache info run dir", ("cache", "info", "{run}"), 2, r"no feature cache at"),
    ("cache verify missing", ("cache", "verify", "{missing}"), 2, r"no feature cache at"),
    ("cache info damaged store", ("cache", "info", "{damaged_cache}"), 2, r"features\.zarr"),
    ("cache info typer missing argument", ("cache", "info"), 2, r"Missing argument"),
    # eval
    ("eval --episodes 0", ("eval", "{run}", "--episodes", "0"), 2, r"--episodes must be at least 1, got 0"),
    ("eval --episodes -3", ("eval", "{run}", "--episodes", "-3"), 2, r"--episodes must be at least 1, got -3"),
    ("eval --queries 0", ("eval", "{run}", "--queries", "0"), 2, r"--queries must be at least 1"),
    ("eval --queries 50", ("eval", "{run}", "--queries", "50", "--episodes", "5"), 2,
     r"with 50 queries per class .* the test split"),
    ("eval --checkpoint foo", ("eval", "{run}", "--checkpoint", "foo"), 2, r"--checkpoint 'foo': choose best or last"),
    ("eval --device foo", ("eval", "{run}", "--device", "foo"), 2, r"--device 'foo'"),
    ("eval missing run", ("eval", "{missing}"), 2, r"is not a run directory \(no config\.yaml\)"),
    ("eval a cache", ("eval", "{cache}"), 2, r"is not a run directory"),
    ("eval damaged checkpoint", ("eval", "{broken}", "--episodes", "5"), 2,
     r"heads\.safetensors is not a readable safetensors file .*header too large"),
    ("eval damaged config", ("eval", "{damaged_config}"), 2, r"config\.yaml is damaged"),
    ("eval --cache not a cache", ("eval", "{run}", "--cache", "{run}"), 2, r"no feature cache at"),
    # compare
    ("compare different episodes", ("compare", "{run}", "{other}"), 2, r"were evaluated on different episodes"),
    ("compare unevaluated run", ("compare", "{run}", "{broken}"), 2, r"has no results\.json; run `clipspm eval"),
    ("compare missing run", ("compare", "{run}", "{missing}"), 2, r"has no results\.json"),
    ("compare damaged results", ("compare", "{run}", "{damaged_results}"), 2, r"results\.json is damaged"),
    # demo
    ("demo --shots 0", ("demo", "--shots", "0", "--runs-dir", "{missing}"), 2, r"train\.shots=0 is not valid"),
    ("demo --episodes 0", ("demo", "--episodes", "0", "--runs-dir", "{missing}"), 2, r"train\.episodes=0"),
    ("demo --eval-episodes 0", ("demo", "--eval-episodes", "0", "--runs-dir", "{missing}"), 2,
     r"--eval-episodes must be at least 1"),
    # ablate
    ("ablate damaged suite", ("ablate", "--suite", "{bad_yaml}", "--runs-dir", "{missing}"), 2, r"is not valid YAML"),
    ("ablate suite without variants", ("ablate", "--suite", "{no_variants_yaml}", "--runs-dir", "{missing}"), 2,
     r"`variants` must be a non-empty list"),
    ("ablate unknown suite", ("ablate", "--suite", "nothere", "--runs-dir", "{missing}"), 2, r"no shipped suite"),
    ("ablate --shots 0", ("ablate", "--suite", "components", "--shots", "0", "--runs-dir", "{missing}"), 2,
     r"--shots needs K values of at least 1"),
    ("ablate --shots text", ("ablate", "--suite", "components", "--shots", "a,b", "--runs-dir", "{missing}"), 2,
     r"--shots takes comma-separated integers"),
    ("ablate --devices nonsense", ("ablate", "--suite", "components", "--devices", "foo,bar",
                                   "--runs-dir", "{missing}"), 2, r"--devices 'foo' is not a device name"),
    ("ablate --parallel 0", ("ablate", "--suite", "components", "--parallel", "0", "--runs-dir", "{missing}"), 2,
     r"--parallel must be at least 1"),
    ("ablate --parallel text", ("ablate", "--suite", "components", "--parallel", "many", "--runs-dir", "{missing}"),
     2, r"--parallel takes auto or a number"),
    ("ablate typer missing option", ("ablate",), 2, r"Missing option '--suite'"),
    # report
    ("report run dir", ("report", "{run}"), 2, r"is not a suite directory"),
    ("report missing", ("report", "{missing}"), 2, r"is not a suite directory"),
    ("report damaged suite.yaml", ("report", "{damaged_suite}"), 2, r"suite\.yaml is damaged"),
    # methods, config, datasets
    ("methods bad option", ("methods", "--bogus"), 2, r"No such option"),
    ("config unknown method", ("config", "--kind", "nope"), 2, r"unknown model\.kind 'nope'"),
    ("config --show unknown key", ("config", "--show", "--set", "train.foo=1"), 2, r"unknown config key train\.foo"),
    ("config --show bad value", ("config", "--show", "--set", "train.lr=abc"), 2, r"train\.lr='abc'"),
    ("config --show damaged file", ("config", "--show", "--config", "{bad_yaml}"), 2, r"is not valid YAML"),
    ("config --stage nope", ("config", "--stage", "nope"), 2, r"Invalid value for '--stage'"),
    ("datasets bad option", ("datasets", "--bogus"), 2, r"No such option"),
]


def run_main(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """`clipspm ARGS` in this process: its exit status and everything it printed."""
    monkeypatch.setattr(sys, "argv", ["clipspm", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    captured = capsys.readouterr()
    return exited.value.code, captured.out + captured.err


def fill(args: tuple[str, ...], world: dict[str, str]) -> list[str]:
    return [arg.format(**world) for arg in args]


@pytest.mark.parametrize(("case", "args", "status", "message"), CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_message_without_traceback(case, args, status, message, world, monkeypatch, capsys,
                                                    tmp_path):
    monkeypatch.chdir(tmp_path)   # anything a case would write by default (caches/, runs/, data/) stays here
    new = tmp_path / "new-run"    # where a training case would start its run
    code, output = run_main(fill(args, {**world, "new": str(new)}), monkeypatch, capsys)
    flat = " ".join(output.split())   # messages wrap at the console width
    assert code == status, output
    assert re.search(message, flat), output
    assert "Traceback" not in output
    assert "weights_only" not in output, "never relay torch's advice to load with weights_only=False"
    assert "Detected pickle protocol" not in output
    assert not new.exists(), "a refused start wrote its run directory"


def test_refused_starts_leave_no_run_directory_and_no_episode_file(synthetic_cache, tmp_path, monkeypatch,
                                                                    capsys):
    episodes = synthetic_cache / "episodes"
    before = sorted(episodes.iterdir()) if episodes.exists() else []
    run = tmp_path / "run"
    for bad in (["--shots", "0"], ["--shots", "100"], ["--set", "train.lr=abc"], ["--set", "train.val_queries=20"],
                ["--set", "train.val_episodes=0"]):
        code, output = run_main(["train", "--cache", str(synthetic_cache), "--run-dir", str(run), "--no-progress",
                                 *bad], monkeypatch, capsys)
        assert code == 2 and "Traceback" not in output, output
        assert not run.exists(), f"{bad} wrote {run}"
    assert (sorted(episodes.iterdir()) if episodes.exists() else []) == before, "a refused start drew episodes"

    # the corrected command starts the run: no --resume needed, nothing stale in the way
    code, output = run_main(["train", "--cache", str(synthetic_cache), "--run-dir", str(run), "--no-progress",
                             *(f"--set={item}" for item in SHORT)], monkeypatch, capsys)
    assert code == 0, output
    assert (run / CONFIG_NAME).exists() and (run / "checkpoints" / "last").exists()


def test_a_start_that_died_before_its_first_checkpoint_is_started_again(synthetic_cache, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG_NAME).write_text("train: {lr: 0.5}\n")   # left by a start that died
    (run / "metrics.jsonl").write_text(json.dumps({"episode": 16, "loss": 9.0}) + "\n")
    (run / "checkpoints" / "last.tmp").mkdir(parents=True)   # its first checkpoint, half written
    (run / "events.out.tfevents.0.stale").write_bytes(b"")

    for resume in (False, True):   # with or without --resume: there is nothing to resume
        train_heads(heads_config(synthetic_cache, *SHORT), run, resume=resume, progress=False)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert records[0]["episode"] == 16 and records[0]["loss"] != 9.0
        assert OmegaConf.load(run / CONFIG_NAME).train.lr == heads_config(synthetic_cache).train.lr != 0.5
        assert not (run / "checkpoints" / "last.tmp").exists() and not (run / "events.out.tfevents.0.stale").exists()
        if not resume:
            with pytest.raises(ClipspmError, match="already holds a run; pass --resume"):
                train_heads(heads_config(synthetic_cache, *SHORT), run, progress=False)
            shutil.rmtree(run / "checkpoints")   # back to a start without a checkpoint


def test_the_installed_command_prints_no_traceback(world, tmp_path):
    """The same contract through `python -m clipspm`: exit status, message, no traceback, no torch advice."""
    chosen = {"train --shots 100", "eval --episodes 0", "extract --pretrained random .pt", "ablate --devices nonsense",
              "train typer bad option"}
    for case, args, status, message in (case for case in CASES if case[0] in chosen):
        done = run_cli(*fill(args, {**world, "new": str(tmp_path / "new-run")}), cwd=tmp_path,
                       env={"OMP_NUM_THREADS": "1"})
        output = done.stdout + done.stderr
        assert done.returncode == status, (case, output)
        assert re.search(message, " ".join(output.split())), (case, output)
        assert "Traceback" not in output and "weights_only" not in output, (case, output)


def test_a_programming_error_still_shows_its_traceback(monkeypatch, capsys):
    """Only a user's error is turned into a message: a bug must stay visible with where it happened."""
    def broken():
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(sys.modules["clipspm.pipeline.methods"], "methods", broken)
    monkeypatch.setattr(sys, "argv", ["clipspm", "methods"])
    with pytest.raises(ZeroDivisionError):
        main()


def test_messages_name_the_split_and_count_queries_in_words():
    from clipspm.stages.episodes import EpisodeSampler

    labels = torch.arange(4).repeat_interleave(3)
    with pytest.raises(ClipspmError, match=r"5-way 1-shot episodes with 1 query per class need 5 classes .* "
                                           r"the val split has 4 such classes \(of 4, with at most 3 videos each\)"):
        EpisodeSampler(labels, ways=5, shots=1, queries=1, split="val")
    with pytest.raises(ClipspmError, match=r"with 2 queries per class"):
        EpisodeSampler(labels, ways=4, shots=2, queries=2, split="test")


def test_pipes_get_wide_lines(monkeypatch):
    from clipspm.system import PIPE_WIDTH, make_console

    monkeypatch.delenv("COLUMNS", raising=False)
    assert make_console().width == PIPE_WIDTH   # under pytest stderr is not a terminal


def test_device_names_are_checked_before_anything_runs():
    from clipspm.system import resolve_device

    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ClipspmError, match="not a device name"):
        resolve_device("gpu0")
    with pytest.raises(ClipspmError, match="only CPU and CUDA"):
        resolve_device("meta")


@pytest.mark.parametrize(("args", "message"), [(["--backbone", "nope"], "unknown open_clip model 'nope'"),
                                               (["--normalize", "imagenet"], "--normalize imagenet"),
                                               (["--class-names", "mine"], "--class-names mine")])
def test_a_bad_extract_setting_is_refused_before_the_synthetic_dataset_is_generated(args, message, tmp_path,
                                                                                     monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, output = run_main(["extract", *args], monkeypatch, capsys)
    assert code == 2 and message in output
    assert list(tmp_path.iterdir()) == [], "nothing (data/, caches/) is made before the settings are checked"
