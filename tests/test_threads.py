"""The CPU thread policy: decoding workers and torch threads never ask for more cores than the process may keep
busy, parallel CPU trainers split the cores, $CLIPSPM_THREADS overrides, and the stages run as planned."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import clipspm.stages.finetune as finetune_stage
import clipspm.stages.heads as heads_stage
from clipspm import system
from clipspm.errors import ClipspmError
from clipspm.stages.extract import ExtractOptions, extract
from clipspm.stages.finetune import train_finetune
from clipspm.stages.heads import train_heads
from clipspm.system import THREADS_VARIABLE, core_budget, keeps_caller_threads, plan_threads, trainer_share, use_threads
from tests.conftest import OTAM_SUITE_YAML, heads_config, run_cli


@pytest.fixture
def caller_threads():
    """Two torch threads in the caller, whatever the test sets, and the caller's count back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


def test_cpu_workers_and_threads_never_exceed_the_cores():
    for cores, workers, start, explicit in itertools.product(range(1, 17), range(0, 10), range(1, 17), (False, True)):
        plan = plan_threads("cpu", workers, cores=cores, torch_threads=start, explicit=explicit)
        assert plan.workers + plan.threads <= cores, plan
        assert plan.threads >= 1 and 0 <= plan.workers <= workers


def test_cpu_plan_leaves_the_tower_the_cores_the_workers_do_not_take():
    assert plan_threads("cpu", 8, cores=2, torch_threads=2) == system.ThreadPlan(2, 1, 1)
    assert plan_threads("cpu", 8, cores=16, torch_threads=16) == system.ThreadPlan(16, 8, 8)
    assert plan_threads("cpu", 4, cores=1, torch_threads=1) == system.ThreadPlan(1, 0, 1), "decode in the trainer"
    assert plan_threads("cpu", 0, cores=2, torch_threads=2).threads == 2, "no workers: every core is the tower's"


def test_cpu_threads_stay_at_torchs_start_unless_the_budget_is_explicit():
    assert plan_threads("cpu", 0, cores=16, torch_threads=8).threads == 8, "torch starts at the physical cores"
    assert plan_threads("cpu", 0, cores=2, torch_threads=1).threads == 1, "a caller's (or OMP_NUM_THREADS') 1"
    assert plan_threads("cpu", 0, cores=16, torch_threads=8, explicit=True).threads == 16


def test_gpu_plan_keeps_the_threads_and_holds_workers_to_the_cores():
    assert plan_threads("cuda", 8, cores=2, torch_threads=2) == system.ThreadPlan(2, 2, 2)
    assert plan_threads("cuda", 8, cores=32, torch_threads=16) == system.ThreadPlan(32, 8, 16)


def test_parallel_trainers_split_the_cores():
    assert trainer_share(2, cores=2) == 1, "ablate --devices cpu,cpu on 2 cores: one core each"
    assert trainer_share(3, cores=16) == 5
    assert trainer_share(1, cores=16) == 16
    assert trainer_share(1, 1, cores=2) == 1, "a GPU trainer keeps one core busy feeding its device"
    assert trainer_share(4, cores=2) == 1, "more trainers than cores: one thread each, never none"


def test_budget_is_the_override_else_the_cores_shared_among_local_ranks(monkeypatch):
    monkeypatch.setattr(system, "usable_cores", lambda: 8)
    monkeypatch.delenv(THREADS_VARIABLE, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert core_budget() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert core_budget() == 2, "four torchrun processes on this machine"
    monkeypatch.setenv(THREADS_VARIABLE, "3")
    assert core_budget() == 3
    for bad in ("0", "two", "-1", "1.5"):
        monkeypatch.setenv(THREADS_VARIABLE, bad)
        with pytest.raises(ClipspmError, match=f"{THREADS_VARIABLE}=.*number of CPU cores"):
            core_budget()


def test_use_threads_sets_torch_and_the_decorator_gives_the_callers_count_back(monkeypatch, caller_threads):
    monkeypatch.setenv(THREADS_VARIABLE, "1")

    @keeps_caller_threads
    def stage() -> int:
        use_threads("cpu")
        return torch.get_num_threads()

    assert stage() == 1
    assert torch.get_num_threads() == caller_threads


class _ThreadsOfWorker(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        return torch.get_num_threads()


def test_dataloader_workers_run_one_torch_thread_as_the_policy_counts_them(caller_threads):
    assert list(DataLoader(_ThreadsOfWorker(), batch_size=None, num_workers=1)) == [1, 1]


def _record_threads(monkeypatch, module, name: str) -> list[int]:
    """The torch thread count in effect at every call of `module.name` during a stage."""
    seen, original = [], getattr(module, name)

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    return seen


def test_heads_stage_trains_with_the_planned_threads(synthetic_cache, tmp_path, monkeypatch, capsys, caller_threads):
    monkeypatch.setenv(THREADS_VARIABLE, "1")
    seen = _record_threads(monkeypatch, heads_stage, "episode_loss")
    train_heads(heads_config(synthetic_cache, "train.episodes=32", "train.val_every=32", "train.val_episodes=10"),
                tmp_path / "run", progress=False, device="cpu")
    assert seen and set(seen) == {1}
    assert "heads on cpu: 1 torch thread(s) on 1 core(s)" in capsys.readouterr().err
    assert torch.get_num_threads() == caller_threads


def test_finetune_stage_shares_the_cores_between_decoding_workers_and_the_tower(video_root, tmp_path, monkeypatch,
                                                                                  capsys, caller_threads):
    from clipspm.config import resolve_config

    extract(ExtractOptions(dataset="custom", root=video_root, backbone="clipspm-tiny-vit", pretrained="none",
                           train_views=0, cache_root=tmp_path / "caches", workers=0, progress=False))
    monkeypatch.setenv(THREADS_VARIABLE, "2")
    seen = _record_threads(monkeypatch, finetune_stage, "forward_episodes")
    workers, loader = [], finetune_stage.DataLoader
    monkeypatch.setattr(finetune_stage, "DataLoader", lambda *args, **options: workers.append(
        options["num_workers"]) or loader(*args, **options))
    cfg = resolve_config("finetune", "custom", overrides=[
        "data.dataset=custom", f"data.root={video_root}", "data.backbone=clipspm-tiny-vit",
        f"data.cache_dir={tmp_path / 'caches'}", "data.pretrained=none", "data.train_views=0", "train.ways=2",
        "train.shots=1", "train.queries=1", "train.val_queries=1", "train.episodes=2", "train.episodes_per_step=2",
        "train.val_every=2", "train.val_episodes=5", "train.log_every=2", "finetune.workers=8"])
    train_finetune(cfg, tmp_path / "run", progress=False, device="cpu")
    assert seen and set(seen) == {1}, "2 cores: one for the decoding worker, one for the tower"
    assert workers and set(workers) == {1}
    assert "finetune on cpu: 1 torch thread(s) + 1 decoding worker(s) on 2 core(s)" in capsys.readouterr().err
    assert torch.get_num_threads() == caller_threads


def test_parallel_cpu_ablation_workers_run_one_thread_each(synthetic_cache, tmp_path):
    suite_file = tmp_path / "otam.yaml"
    suite_file.write_text(OTAM_SUITE_YAML)
    done = run_cli("ablate", "--suite", str(suite_file), "--shots", "1", "--parallel", "2", "--devices", "cpu,cpu",
                   "--dataset", "synthetic", "--root", str(synthetic_cache.parent.parent / "data"), "--cache-dir",
                   str(synthetic_cache.parent), "--eval-episodes", "20", "--runs-dir", str(tmp_path / "runs"),
                   "--no-progress", cwd=tmp_path, env={THREADS_VARIABLE: "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    logs = "".join(path.read_text() for path in Path(tmp_path / "runs").rglob("workers/*.log"))
    for stage in ("heads", "eval"):
        lines = [line for line in logs.splitlines() if line.startswith(f"{stage} on cpu:")]
        assert len(lines) == 2, logs   # one per run, whichever worker ran it
        assert all(line == f"{stage} on cpu: 1 torch thread(s) on 1 core(s)" for line in lines), lines


def test_a_bad_override_is_refused_with_its_fix(synthetic_cache, tmp_path):
    done = run_cli("train", "--dataset", "synthetic", "--cache", str(synthetic_cache), "--run-dir", str(tmp_path / "r"),
                   "--device", "cpu", "--no-progress", cwd=tmp_path, env={THREADS_VARIABLE: "all"})
    assert done.returncode == 2
    assert f"{THREADS_VARIABLE}='all'" in done.stderr and "unset it" in done.stderr
    assert "Traceback" not in done.stderr
