"""Stage three from a user's point of view: the tower trains (the right parts of it), the step is the
paper's accumulated step whether it is computed in one forward, many, or on two processes, a
killed run resumes to the same weights, and evaluation encodes the test split with the tuned tower.

Tiny towers with random weights on the `video_root` custom dataset; 2-way 1-shot episodes with one
query keep every run to a few seconds on a laptop CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipspm.cache.store import FeatureCache, find_store
from clipspm.config import resolve_config
from clipspm.errors import ClipspmError
from clipspm.pipeline.encoder import file_sha256, load_clip
from clipspm.pipeline.tower import unfreeze
from clipspm.stages import finetune
from clipspm.stages.evaluate import evaluate_run
from clipspm.stages.extract import ExtractOptions, extract
from clipspm.stages.finetune import train_finetune
from clipspm.stages.heads import train_heads
from tests.conftest import kill_after_first_checkpoint, run_cli

VIT, RN = "clipspm-tiny-vit", "clipspm-tiny-rn"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SHORT = ["train.ways=2", "train.shots=1", "train.queries=1", "train.val_queries=1", "train.episodes=4",
         "train.episodes_per_step=2", "train.val_every=2", "train.val_episodes=10", "train.log_every=2",
         "finetune.workers=0", "data.pretrained=none", "data.train_views=0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache_dir(video_root, tmp_path_factory) -> Path:
    """The tiny towers' caches of the custom dataset (text features, labels, the starting weights)."""
    root = tmp_path_factory.mktemp("finetune-caches")
    for backbone in (VIT, RN):
        extract(ExtractOptions(dataset="custom", root=video_root, backbone=backbone, pretrained="none",
                               train_views=0, cache_root=root, workers=0, progress=False))
    return root


def overrides(video_root: Path, cache_dir: Path, backbone: str, *extra: str) -> list[str]:
    return ["data.dataset=custom", f"data.root={video_root}", f"data.backbone={backbone}",
            f"data.cache_dir={cache_dir}", *SHORT, *extra]


def config(video_root: Path, cache_dir: Path, backbone: str = VIT, *extra: str):
    return resolve_config("finetune", "custom", overrides=overrides(video_root, cache_dir, backbone, *extra))


def cli_args(video_root: Path, cache_dir: Path, run: Path, *extra: str) -> list[str]:
    sets = [item for kv in overrides(video_root, cache_dir, VIT, *extra) if not kv.startswith("data.cache_dir")
            for item in ("--set", kv)]
    return ["train", "--stage", "finetune", "--cache-dir", str(cache_dir), "--run-dir", str(run), "--device", "cpu",
            "--no-progress", *sets]


def initial_visual(backbone: str) -> dict[str, torch.Tensor]:
    """The tower every run starts from: the random weights its cache was made with (seed 0)."""
    return {key: value.clone() for key, value in load_clip(backbone, "none", seed=0).model.visual.state_dict().items()}


def saved(run: Path, name: str, checkpoint: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / checkpoint / f"{name}.safetensors"))


def metrics(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{key: value for key, value in record.items() if key != "episodes_per_s"} for record in records]


def assert_same_training(a: Path, b: Path, weights_atol: float = 1e-7) -> None:
    """Same heads and tower weights, and the same gradients behind them (Adam's first moments).

    Weights are compared to `weights_atol`: Adam's step is about lr * sign(g) for gradients far above
    its eps, so float noise in a gradient near zero can move a weight by a fraction of lr (1e-5).
    """
    for name in ("heads", "visual"):
        first, second = saved(a, name), saved(b, name)
        assert first.keys() == second.keys()
        for key in first:
            torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=weights_atol, msg=f"{name} {key}")
    first, second = saved(a, "optimizer"), saved(b, "optimizer")
    assert first.keys() == second.keys()
    for key in (key for key in first if key.endswith("exp_avg")):
        torch.testing.assert_close(first[key], second[key], rtol=1e-3, atol=1e-8, msg=f"gradient moment {key}")


def record_cached_clips(monkeypatch) -> list:
    """The CLIP models the finetune stage loads from its cache, in order (the stage keeps working)."""
    used, original = [], finetune.cached_clip

    def keep(*args):
        used.append(original(*args))
        return used[-1]

    monkeypatch.setattr(finetune, "cached_clip", keep)
    return used


def test_visual_weights_change_and_text_weights_do_not(video_root, cache_dir, tmp_path, monkeypatch):
    used = record_cached_clips(monkeypatch)
    run = tmp_path / "run"
    train_finetune(config(video_root, cache_dir), run, progress=False)

    start, tuned = initial_visual(VIT), saved(run, "visual")
    assert tuned.keys() == start.keys(), "visual.safetensors must hold exactly the tower's state_dict keys"
    assert sum(not torch.equal(tuned[key], start[key]) for key in start) >= len(start) // 2
    fresh = load_clip(VIT, "none", seed=0).model.state_dict()
    text = {key: value for key, value in used[0].model.state_dict().items() if not key.startswith("visual.")}
    assert text and all(torch.equal(value, fresh[key]) for key, value in text.items())
    assert all(not p.requires_grad for name, p in used[0].model.named_parameters() if not name.startswith("visual."))
    load_clip(VIT, "none", weights=run / "checkpoints" / "best" / "visual.safetensors")  # strict: same keys


def test_a_head_with_the_text_tower_in_its_step_fine_tunes_and_evaluates(video_root, cache_dir, tmp_path,
                                                                        monkeypatch):
    # MCDP-FSAR runs the cache model's text tower inside the step: fine-tuning hands it the tower of the
    # model it trains (no second copy), the tower stays frozen, and evaluation on the tuned test cache takes
    # the tower of the cache the run trained from.
    used = record_cached_clips(monkeypatch)
    run = tmp_path / "mcdp"
    train_finetune(config(video_root, cache_dir, VIT, "model.kind=mcdp", "model.num_heads=4", "model.mlp_hidden=32",
                          "model.prompt_hidden=16"), run, progress=False)
    fresh = load_clip(VIT, "none", seed=0).model.state_dict()
    text = {key: value for key, value in used[0].model.state_dict().items() if not key.startswith("visual.")}
    assert all(torch.equal(value, fresh[key]) for key, value in text.items())
    heads = saved(run, "heads")
    assert "context" in heads and not any(key.startswith("tower") for key in heads)
    result = evaluate_run(run, episodes=10, progress=False, device="cpu")
    assert 0 <= result.accuracy <= 1 and not result.label_leak


def test_batchnorm_running_stats_unchanged(video_root, cache_dir, tmp_path):
    run = tmp_path / "run"
    train_finetune(config(video_root, cache_dir, RN), run, progress=False)
    start, tuned = initial_visual(RN), saved(run, "visual")
    statistics = [key for key in start if key.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    batchnorms = [m for m in load_clip(RN, "none").model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(statistics) == 3 * len(batchnorms) > 0
    for key in statistics:
        assert torch.equal(tuned[key], start[key]), key
    assert any(not torch.equal(tuned[key], start[key]) for key in start if key.startswith("bn1.weight"))


def test_accumulated_episodes_equal_one_batched_step(video_root, cache_dir, tmp_path):
    # The paper head: the official one's 8 x 256 attention has weights whose gradients are float noise, which
    # Adam's first, sign-like step moves by a fraction of lr, past these tolerances.
    common = ["train.episodes=16", "train.episodes_per_step=16", "train.val_every=16", "train.log_every=16",
              "model.profile=paper", "model.dropout=0.0"]
    for micro in (1, 16):
        train_finetune(config(video_root, cache_dir, VIT, *common, f"finetune.micro_episodes={micro}"),
                       tmp_path / f"micro{micro}", progress=False)
    assert_same_training(tmp_path / "micro1", tmp_path / "micro16", weights_atol=1e-6)
    for one, batched in zip(metrics(tmp_path / "micro1"), metrics(tmp_path / "micro16"), strict=True):
        assert one.keys() == batched.keys()
        for key in one:
            assert one[key] == pytest.approx(batched[key], rel=1e-4), key


@pytest.mark.parametrize("backbone", [VIT, RN])
def test_activation_checkpointing_gives_the_same_update(video_root, cache_dir, tmp_path, backbone):
    """Recomputing the tower's activations in backward (open_clip's ViT switch, our ResNet wrapping)
    must not change the step: frozen BatchNorm and per-episode dropout seeds make it exact."""
    for on in (True, False):
        train_finetune(config(video_root, cache_dir, backbone, f"finetune.activation_checkpointing={on}"),
                       tmp_path / f"checkpointing-{on}", progress=False)
    assert_same_training(tmp_path / "checkpointing-True", tmp_path / "checkpointing-False", weights_atol=1e-6)


def test_bf16_autocast_trains_close_to_fp32(video_root, cache_dir, tmp_path):
    """The bf16 path CUDA runs by default, exercised on the CPU: same data, losses within bf16 precision."""
    for precision in ("bf16", "fp32"):
        train_finetune(config(video_root, cache_dir, VIT, f"finetune.precision={precision}"), tmp_path / precision,
                       progress=False)
    start, tuned = initial_visual(VIT), saved(tmp_path / "bf16", "visual")
    assert all(value.dtype == start[key].dtype for key, value in tuned.items()), "weights stay float32"
    assert sum(not torch.equal(tuned[key], start[key]) for key in start) >= len(start) // 2
    losses = [[record["loss"] for record in metrics(tmp_path / precision) if "loss" in record]
              for precision in ("bf16", "fp32")]
    assert losses[0] and all(torch.isfinite(torch.tensor(losses[0])))
    assert losses[0] == pytest.approx(losses[1], rel=0.05)
    with pytest.raises(ClipspmError, match="finetune.precision='fp16' is not valid: it expects one of auto, bf16"):
        config(video_root, cache_dir, VIT, "finetune.precision=fp16")   # fp16 would need loss scaling


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_torchrun_matches_single_process(video_root, cache_dir, tmp_path):
    extra = ["train.episodes=8", "train.episodes_per_step=4", "train.val_every=4", "train.log_every=4",
             "finetune.workers=1", "model.profile=paper"]     # see test_accumulated_episodes_equal_one_batched_step
    single = tmp_path / "single"
    train_finetune(config(video_root, cache_dir, VIT, *extra), single, progress=False)
    two = tmp_path / "two"
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "clipspm", *cli_args(video_root, cache_dir, two, *extra)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, **ONE_THREAD})
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert_same_training(single, two, weights_atol=1e-6)
    for a, b in zip(metrics(single), metrics(two), strict=True):
        assert a == pytest.approx(b, rel=1e-4)


def test_resume_after_kill_equals_uninterrupted(video_root, cache_dir, tmp_path):
    extra = ["train.episodes=12"]
    clean = tmp_path / "clean"
    train_finetune(config(video_root, cache_dir, VIT, *extra), clean, progress=False)

    killed = tmp_path / "killed"
    episode = kill_after_first_checkpoint(cli_args(video_root, cache_dir, killed, *extra), killed, cwd=tmp_path,
                                          env=ONE_THREAD)
    assert episode < 12, "the kill should land mid-run"

    train_finetune(config(video_root, cache_dir, VIT, *extra), killed, resume=True, progress=False)
    assert_same_training(clean, killed)
    assert metrics(clean) == metrics(killed)


def test_eval_of_finetuned_run_uses_a_cache_made_with_tuned_weights(video_root, cache_dir, tmp_path):
    run = tmp_path / "run"
    cfg = config(video_root, cache_dir)
    train_finetune(cfg, run, progress=False)
    result = evaluate_run(run, episodes=30, progress=False)

    results = json.loads((run / "results.json").read_text())
    assert results["cache"] == result.cache and results["episodes"] == 30
    assert Path(results["episodes_file"]).is_absolute() and Path(results["episodes_file"]).is_file()  # as heads runs
    assert Path(results["cache"]).is_absolute()
    tuned = run / "checkpoints" / "best" / "visual.safetensors"
    with FeatureCache(find_store(Path(result.cache))) as cache:
        settings = cache.meta["settings"]
        base = load_clip(VIT, "none", seed=0).weight_sha256
        assert settings["tuned_weights_sha256"] == hashlib.sha256((base + file_sha256(tuned)).encode()).hexdigest()
        assert settings["splits"] == ["test"] and settings["train_views"] == 0
        row = int(cache.rows("test")[0])
        stored = torch.from_numpy(cache.features[row, 0]).float()
    assert Path(result.cache).resolve() != Path(cfg.data.cache).resolve()   # not the training cache
    assert stored.abs().sum() > 0

    # the same cache is what `clipspm extract --weights RUN` finds: one address for the tuned test features
    caches_before = sorted(cache_dir.iterdir())
    again = run_cli("extract", "--dataset", "custom", "--root", str(video_root), "--backbone", VIT,
                    "--pretrained", "none", "--weights", str(run), "--splits", "test", "--train-views", "0",
                    "--cache-dir", str(cache_dir), "--no-progress", cwd=tmp_path, env=ONE_THREAD)
    assert "reused the finished cache" in again.stdout, again.stdout + again.stderr   # exit 1: broken test videos
    assert sorted(cache_dir.iterdir()) == caches_before
    tower = load_clip(VIT, "none", seed=0, weights=tuned)
    assert tower.weight_sha256 == settings["weight_sha256"]


@pytest.fixture(scope="module")
def heads_run(video_root, cache_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("heads") / "run"
    heads_settings = [item for item in overrides(video_root, cache_dir, VIT) if not item.startswith("finetune.")]
    cfg = resolve_config("heads", "custom", overrides=[*heads_settings, "train.episodes=8"])
    train_heads(cfg, run, progress=False)
    return run


def test_init_from_heads_run_of_another_width_is_refused(video_root, cache_dir, heads_run, tmp_path):
    with pytest.raises(ClipspmError, match=r"clipspm-tiny-vit features 64 wide.*RN50 gives features 1024 wide"):
        train_finetune(config(video_root, cache_dir, "RN50"), tmp_path / "run", init=heads_run, progress=False)
    assert not (tmp_path / "run").exists()


def test_unfreeze_last_n_blocks_only(video_root, cache_dir, heads_run, tmp_path):
    rn = load_clip(RN, "none").model.visual
    trainable = {name for name, p in rn.named_parameters() if p in set(unfreeze(rn, "last", 2))}
    assert trainable == {name for name, _ in rn.named_parameters() if name.startswith(("layer4.", "attnpool."))}
    with pytest.raises(ClipspmError, match="has 5 blocks"):
        unfreeze(rn, "last", 6)

    run = tmp_path / "run"
    train_finetune(config(video_root, cache_dir, VIT, "finetune.unfreeze=last", "finetune.blocks=1"), run,
                   init=heads_run, progress=False)
    start, tuned = initial_visual(VIT), saved(run, "visual")
    after = ("transformer.resblocks.1.", "ln_post.", "proj")
    for key in start:
        if not key.startswith(after):
            assert torch.equal(tuned[key], start[key]), f"{key} is before the last block and must stay frozen"
    assert all(not torch.equal(tuned[key], start[key]) for key in ("proj", "transformer.resblocks.1.mlp.c_fc.weight"))
    # --init: the heads start from the heads run's best checkpoint (two Adam steps of lr 1e-5 move them little)
    initial, tuned_heads = saved(heads_run, "heads", "best"), saved(run, "heads")
    assert max((initial[key] - tuned_heads[key]).abs().max().item() for key in initial) < 1e-4


def test_a_start_refused_for_its_episodes_writes_nothing(video_root, cache_dir, tmp_path):
    with pytest.raises(ClipspmError, match=r"100-shot .* the train split"):
        train_finetune(config(video_root, cache_dir, VIT, "train.shots=100"), tmp_path / "run", progress=False)
    with pytest.raises(ClipspmError, match=r"20 queries per class .* the val split"):
        train_finetune(config(video_root, cache_dir, VIT, "train.val_queries=20"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    assert not [path for path in cache_dir.rglob("episodes/*") if "100shot" in path.name or "20query" in path.name]


def test_out_of_memory_names_the_options_that_lower_memory(video_root, cache_dir, tmp_path, monkeypatch):
    def exhausted(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(finetune, "forward_episodes", exhausted)
    with pytest.raises(ClipspmError, match=r"micro_episodes.*activation_checkpointing.*finetune.blocks.*shots"):
        train_finetune(config(video_root, cache_dir), tmp_path / "run", progress=False)


def test_missing_video_root_is_a_dataset_error(video_root, cache_dir, tmp_path):
    from clipspm.errors import DatasetError

    cfg = config(video_root, cache_dir)
    with FeatureCache(find_store(next(cache_dir.glob("custom-clipspm-tiny-vit-none-T8-*")))) as cache:
        cfg.data.cache = str(cache.store_path.parent)
    cfg.data.root = str(tmp_path / "moved")
    with pytest.raises(DatasetError, match="moved does not exist"):
        train_finetune(cfg, tmp_path / "run", progress=False)
