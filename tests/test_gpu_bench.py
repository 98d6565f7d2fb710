"""benchmarks/gpu.py: its smoke run on the CPU goes through every section, its time guard keeps what was
measured, and it needs nothing the GPU machine lacks; train.cuda_graph trains what the eager step trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.conftest import heads_config

ROOT = Path(__file__).resolve().parents[1]


def _environment() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _tables(markdown: str) -> list[list[str]]:
    """The Markdown tables of a document, each as its lines."""
    tables, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_gpu_benchmark_smoke_run_measures_every_section_and_writes_its_tables(tmp_path):
    from benchmarks.gpu import SECTIONS

    out = tmp_path / "out"
    completed = subprocess.run([sys.executable, "benchmarks/gpu.py", "--smoke", "--out", str(out), "--work",
                                str(tmp_path / "work")], cwd=ROOT, env=_environment(), capture_output=True,
                               text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    result = json.loads((out / "gpu.json").read_text())
    assert list(result["sections"]) == list(SECTIONS)
    for name, section in result["sections"].items():
        assert section["status"] == "done", (name, section)
        numbers = [value for rows in section["tables"].values() for row in rows for value in row.values()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)]
        numbers += [value for value in section["values"].values() if isinstance(value, (int, float))]
        assert numbers and all(value == value for value in numbers), name   # figures, none NaN
    assert result["environment"]["torch"] == torch.__version__
    assert {row["figure"].split(" ")[1] for row in result["targets"][:2]} == {"heads", "test"}
    assert all(row["measured"] != "not measured" for row in result["targets"])

    markdown = (out / "gpu.md").read_text()
    for name in SECTIONS[1:]:
        assert f"## {name}:" in markdown
    tables = _tables(markdown)
    assert len(tables) >= 1 + len(SECTIONS[1:])   # the targets, then at least one table per section
    for table in tables:
        header, rule, *rows = table
        assert set(rule) <= set("|-") and rows, table
        assert {line.count("|") for line in table} == {header.count("|")}, table   # every row has every column


def _fake_section(ctx, rec) -> None:
    rec.row("steps", {"measured": 1.5})
    time.sleep(60)


def test_a_section_stopped_at_its_time_limit_keeps_what_it_recorded(tmp_path, monkeypatch):
    from benchmarks import gpu

    monkeypatch.setitem(gpu.SECTION_FUNCTIONS, "launch", _fake_section)
    plan = replace(gpu.SMOKE_PLAN, caps_s={**gpu.SMOKE_PLAN.caps_s, "launch": 3.0})
    started = time.monotonic()
    result = gpu.run(plan, tmp_path / "out", tmp_path / "work", ("launch",), "cpu")
    assert time.monotonic() - started < 30
    section = result["sections"]["launch"]
    assert section["status"] == "timed out"
    assert section["tables"]["steps"] == [{"measured": 1.5}]
    assert json.loads((tmp_path / "out" / "gpu.json").read_text())["sections"]["launch"]["status"] == "timed out"
    assert "- launch (timed out)" in (tmp_path / "out" / "gpu.md").read_text()


def test_sections_that_do_not_fit_the_budget_are_skipped_with_the_reason(tmp_path):
    from benchmarks import gpu

    plan = replace(gpu.SMOKE_PLAN, budget_s=0.5)
    result = gpu.run(plan, tmp_path / "out", tmp_path / "work", ("env", "heads_run"), "cpu")
    assert [section["status"] for section in result["sections"].values()] == ["skipped", "skipped"]
    assert "of the budget left" in result["sections"]["heads_run"]["note"]
    assert {row["measured"] for row in result["targets"]} == {"not measured"}
    assert "- heads_run (skipped)" in (tmp_path / "out" / "gpu.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_a_gpu_run_without_cuda_is_refused_with_the_fix(tmp_path):
    completed = subprocess.run([sys.executable, "benchmarks/gpu.py", "--out", str(tmp_path / "out"), "--work",
                                str(tmp_path / "work")], cwd=ROOT, env=_environment(), capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 2
    assert "no CUDA device" in completed.stderr and "--smoke" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert json.loads((tmp_path / "out" / "gpu.json").read_text())["sections"]["env"]["status"] == "failed"


def test_gpu_benchmark_imports_without_pyav(tmp_path):
    """The GPU machine has no PyAV: nothing the benchmark imports may need it (videos are written with OpenCV)."""
    blocker = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'av' or name.startswith('av.'):\n"
               "            raise ImportError('PyAV is not installed here')\n"
               "sys.meta_path.insert(0, Block())\n"
               "import benchmarks.gpu\n"
               "print('av' in sys.modules)\n")
    completed = subprocess.run([sys.executable, "-c", blocker], cwd=ROOT, env=_environment(), capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip() == "False"


def test_heads_rate_measures_each_profile_of_the_clipspm_method_data(monkeypatch):
    from benchmarks import gpu
    from clipspm.pipeline.methods import get_method

    method = get_method("clipspm")
    monkeypatch.setattr(gpu, "get_method", lambda name: replace(method, defaults="clipspm"))
    monkeypatch.setattr(gpu, "method_data", lambda name: {"profiles": {"official": {}, "paper": {}}})
    assert gpu.clipspm_profiles() == ["official", "paper"]
    monkeypatch.setattr(gpu, "method_data", lambda name: {"model": {}})
    assert gpu.clipspm_profiles() == [None]
    monkeypatch.setattr(gpu, "get_method", lambda name: replace(method, defaults=None))
    assert gpu.clipspm_profiles() == [None]


def _heads_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from clipspm.stages.checkpoint import HEADS

    return load_file(str(run_dir / "checkpoints" / "last" / HEADS))


def test_cuda_graph_setting_leaves_a_cpu_run_unchanged(synthetic_cache, tmp_path):
    from clipspm.stages.heads import train_heads

    schedule = ("train.episodes=8", "train.episodes_per_step=4", "train.val_every=4", "train.val_episodes=10",
                "train.log_every=4")
    for name, graph in (("eager", "false"), ("graph", "true")):
        train_heads(heads_config(synthetic_cache, *schedule, f"train.cuda_graph={graph}"), tmp_path / name,
                    progress=False, device="cpu")
    eager, graphed = _heads_weights(tmp_path / "eager"), _heads_weights(tmp_path / "graph")
    assert eager.keys() == graphed.keys()
    for key in eager:
        assert torch.equal(eager[key], graphed[key]), key
    assert (tmp_path / "eager" / "metrics.jsonl").read_text().count("\n") == \
        (tmp_path / "graph" / "metrics.jsonl").read_text().count("\n")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graphed_heads_step_trains_the_weights_of_the_eager_step():
    from benchmarks import heads
    from clipspm.config import resolve_config

    device = torch.device("cuda")
    cfg = resolve_config("heads", "synthetic", overrides=["train.shots=1"])
    data = heads.random_split(heads.CLASSES["train"], 512, 5, device)
    graph, graph_head = heads.trainer_steps(cfg, data, device, graph=True, seed=3)
    eager, eager_head = heads.trainer_steps(cfg, data, device, capturable=True, seed=3)
    for _ in range(8):   # 3 eager warm-up steps, the captured one, then replays
        torch.testing.assert_close(graph(), eager(), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(graph_head.named_parameters(), eager_head.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
