"""Released CLIP-SPM checkpoints as runs: read without running pickled code, checked key by key before
anything is written, scored through a test cache of the imported tower with the released preparation of
frames (no CLIP normalisation, released sampling) and class names, fine-tuned from with `--init`.

The checkpoints are made here, in the released layout (torch.save of the dict run/main_run.py writes), from
tiny open_clip towers with random weights and official-profile heads at the tiny width mapped back to the
released names (configs/methods/clipspm_released_keys.yaml).
"""

from __future__ import annotations

import collections
import json
import zipfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import clipspm
from clipspm.cache.store import FeatureCache, find_store
from clipspm.config import resolve_config
from clipspm.datasets import load_dataset
from clipspm.datasets.class_names import released_class_texts, with_class_names
from clipspm.datasets.registry import shipped_classes
from clipspm.errors import ClipspmError, DatasetError
from clipspm.pipeline import build_head, episode_step
from clipspm.pipeline.encoder import file_sha256, load_clip
from clipspm.pipeline.episode import Episode
from clipspm.pipeline.methods.clipspm import released_heads_state_dict, released_keys
from clipspm.stages import finetune
from clipspm.stages.extract import ExtractOptions, content_settings, extract, view_settings
from clipspm.stages.import_checkpoint import ImportOptions, import_checkpoint
from clipspm.stages.runs import check_run_dir
from clipspm.video.sampling import released_test_indices, released_train_indices, video_rng
from clipspm.video.views import ViewSettings, load_views
from tests.conftest import run_cli
from tests.test_clipspm_official import OFFICIAL_CASES, gradients, official_case

RN, VIT = "clipspm-tiny-rn", "clipspm-tiny-vit"
FIXTURES = Path(__file__).parent / "fixtures" / "clipspm_official"
SHORT = ["train.ways=2", "train.shots=1", "train.queries=1", "train.val_queries=1", "train.episodes=4",
         "train.episodes_per_step=2", "train.val_every=4", "train.val_episodes=4", "train.log_every=2",
         "finetune.workers=0", "data.train_views=0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def released_head(dataset: str = "synthetic", dim: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """An official-profile head at the width `dataset` resolves to, random weights, under the released names."""
    cfg = resolve_config("finetune", dataset, overrides=["model.kind=clipspm", "model.profile=official"])
    torch.manual_seed(seed)
    head = build_head(cfg.model, cfg.loss, dim)
    ours = {key: torch.randn_like(value) * 0.1 for key, value in head.state_dict().items()}
    released = {key: ours[entry["to"]] for key, entry in released_keys()["keys"].items()}
    return {**released, "scale": torch.ones(1)}


def tower_state(model: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A tuned tower: the tiny model's visual tower with random weights (BatchNorm statistics included)."""
    visual = load_clip(model, "none", seed=seed).model.visual
    generator = torch.Generator().manual_seed(seed)
    state = {key: (torch.randn(value.shape, generator=generator) * 0.05 if value.is_floating_point() else value)
             for key, value in visual.state_dict().items()}
    return {key: value.abs() + 1 if key.endswith("running_var") else value for key, value in state.items()}


def save_released(path: Path, head: dict, tower: dict, prefix: str = "backbone.", acc=np.float64(61.25)) -> Path:
    """torch.save of the dict run/main_run.py save_checkpoint writes."""
    state = collections.OrderedDict({prefix + key: value for key, value in tower.items()})
    state.update(head)
    parameters = [torch.nn.Parameter(value.clone()) for value in head.values()]
    optimizer = torch.optim.Adam(parameters, lr=1e-5, betas=(0.5, 0.999), weight_decay=5e-5)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1000000], gamma=0.1)
    torch.save({"iteration": 12001, "model_state_dict": state, "optimizer_state_dict": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "acc": acc}, path)
    return path


def options(source: Path, out: Path, backbone: str = RN, **extra) -> ImportOptions:
    return ImportOptions(source=source, out=out, backbone=backbone, dataset=extra.pop("dataset", "synthetic"),
                         cache_dir=out.parent / "caches", **extra)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    from clipspm.datasets.synthetic import ensure_synthetic

    return ensure_synthetic(tmp_path_factory.mktemp("synthetic") / "data", seed=0, videos_per_class=3,
                            progress=False)


@pytest.fixture(scope="module")
def rn_weights(tmp_path_factory) -> Path:
    """The tiny RN model's random weights as a local file: the text tower the class texts come from."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "tiny-rn.safetensors"
    save_file({k: v.contiguous() for k, v in load_clip(RN, "none", seed=7).model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def imported_rn(tmp_path_factory) -> tuple[Path, dict, dict]:
    """An imported RN-like released checkpoint: (run dir, released head, tower)."""
    work = tmp_path_factory.mktemp("imported")
    head, tower = released_head(), tower_state(RN)
    source = save_released(work / "checkpoint_best.pt", head, tower)
    import_checkpoint(options(source, work / "run"))
    return work / "run", head, tower


@pytest.mark.parametrize(("model", "prefix"), [(RN, "backbone."), (VIT, "backbone.module.")])
def test_imported_run_holds_the_checkpoints_tower_and_mapped_heads(tmp_path, model, prefix):
    head, tower = released_head(seed=3), tower_state(model, seed=4)
    source = save_released(tmp_path / "checkpoint_best.pt", head, tower, prefix)
    result = import_checkpoint(options(source, tmp_path / "run", model))
    best = tmp_path / "run" / "checkpoints" / "best"
    visual = load_file(str(best / "visual.safetensors"))
    assert visual.keys() == tower.keys()
    for key, value in tower.items():
        assert torch.equal(visual[key], value), key
    loaded = clipspm.load_run(tmp_path / "run")
    for key, value in released_heads_state_dict(head).items():
        assert torch.equal(loaded.head.state_dict()[key], value), key
    state = json.loads((best / "state.json").read_text())
    assert state == {"imported_from": str(source.resolve()), "sha256": file_sha256(source),
                     "format": "hnlxy/CLIP-SPM run/main_run.py save_checkpoint", "iteration": 12001, "acc": 61.25}
    cfg = loaded.config
    assert (cfg.model.kind, cfg.model.profile, cfg.data.backbone) == ("clipspm", "official", model)
    assert (cfg.data.normalize, cfg.data.sampling, cfg.data.class_names) == ("none", "released", "benchmark")
    assert cfg.train.select_on == "test"      # the released best checkpoint was chosen on the test split
    assert cfg.finetune is not None and result.tower_entries == len(tower) and result.head_entries == len(head)


def test_fixture_parity_weights_import_to_the_mapping_function(tmp_path):
    """The released head of the parity fixtures (C = 16, hmdb gates), saved as a released checkpoint beside a
    tower 16 wide, imports to exactly what released_heads_state_dict makes of it, and the imported heads give
    the released logits, 16-task loss and gradients of every case (1 and 5 shots, 1 and 4 queries)."""
    tiny = json.loads((Path(clipspm.__file__).parent / "configs" / "models" / f"{RN}.json").read_text())
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "clipspm-test-c16.json").write_text(json.dumps({**tiny, "embed_dim": 16}))
    open_clip.add_model_config(folder)
    fixture = load_file(str(FIXTURES / "weights.safetensors"))
    source = save_released(tmp_path / "checkpoint_best.pt", fixture, tower_state("clipspm-test-c16"))
    with pytest.raises(ClipspmError, match="fit hmdb51, kinetics100, ssv2_small alike"):   # 1.5 / 0.5 gates
        import_checkpoint(options(source, tmp_path / "guessed", "clipspm-test-c16", dataset=None))
    import_checkpoint(options(source, tmp_path / "run", "clipspm-test-c16", dataset="hmdb51"))
    run = clipspm.load_run(tmp_path / "run")
    head = run.head.state_dict()
    expected = released_heads_state_dict(fixture)
    assert head.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(head[key], value.float()), key

    # The imported run reproduces the released head's numbers. The fixture ran 2 attention heads of 8 (the
    # tensors hold the width 16, not the head count: imports assume the released 8) with dropout 0.
    model = OmegaConf.merge(run.config.model, {"num_heads": 2, "head_dim": 8, "attention_dropout": 0.0,
                                               "mlp_dropout": 0.0})
    imported = build_head(model, run.config.loss, 16).double()
    imported.load_state_dict(run.head.state_dict())
    for shots, queries in OFFICIAL_CASES:
        case, episode = official_case(shots, queries)
        with torch.no_grad():
            torch.testing.assert_close(imported.eval()(episode).logits, case["logits_eval"], atol=1e-5, rtol=1e-5)
        step = episode_step(imported.train(), episode, run.config.loss, 16)
        torch.testing.assert_close(step.loss, case["loss"], atol=1e-5, rtol=1e-5)
        grads = gradients(imported, step.loss)
        for key, entry in released_keys()["keys"].items():
            torch.testing.assert_close(grads[entry["to"]], case[f"grad.{key}"], atol=1e-5, rtol=1e-5, msg=key)


def test_numpy1_pickles_of_acc_are_admitted(tmp_path):
    """Released checkpoints were written under numpy 1, which pickles `acc` as numpy.core.multiarray.scalar."""
    source = save_released(tmp_path / "numpy2.pt", released_head(), tower_state(RN))
    patched = tmp_path / "numpy1.pt"
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(patched, "w", zipfile.ZIP_STORED) as new:
        for info in old.infolist():
            data = old.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            new.writestr(info.filename, data)
    assert "numpy.core.multiarray.scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(patched)
    assert import_checkpoint(options(patched, tmp_path / "run")).acc == 61.25


class RunsCode:
    """A pickle whose loading would run a shell command (a file made to look like a checkpoint)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "it-ran"
    source = tmp_path / "checkpoint_best.pt"
    head = released_head()
    torch.save({"iteration": 1, "model_state_dict": head, "acc": RunsCode(marker)}, source)
    done = run_cli("import-checkpoint", str(source), "--backbone", RN, "--dataset", "synthetic", "--out",
                   str(tmp_path / "run"), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "weights_only=False" not in done.stderr
    message = " ".join(done.stderr.split())
    assert "system" in message and "It was not executed" in message
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_keys_or_shapes_that_do_not_fit_are_refused_before_anything_is_written(tmp_path):
    head, tower = released_head(), tower_state(RN)
    cases = {
        "missing": ({k: v for k, v in head.items() if k != "context1.layers.0.0.norm.weight"}, tower, RN, "synthetic",
                    "missing context1.layers.0.0.norm.weight"),
        "tower shape": (head, {**tower, "conv1.weight": tower["conv1.weight"][:, :2]}, RN, "synthetic",
                        "backbone.conv1.weight"),
        "other tower": (head, tower, VIT, "synthetic", "not open_clip's clipspm-tiny-vit visual tower"),
        "gates": (head, tower, RN, "ucf101", "gate_text.0.weight is [96, 64]"),
    }
    for name, (released, visual, model, dataset, expected) in cases.items():
        source = save_released(tmp_path / f"{name}.pt", released, visual)
        with pytest.raises(ClipspmError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            import_checkpoint(options(source, tmp_path / name / "run", model, dataset=dataset))
        assert not (tmp_path / name).exists(), name
    done = run_cli("import-checkpoint", str(tmp_path / "gates.pt"), "--backbone", RN, "--dataset", "ucf101", "--out",
                   str(tmp_path / "gates-cli"), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "gate_text.0.weight" in done.stderr
    assert not (tmp_path / "gates-cli").exists()


def test_released_sampling_follows_the_released_loader():
    np.testing.assert_array_equal(released_test_indices(20, 8), [1, 3, 5, 8, 10, 13, 15, 18])   # linspace(1, 18)
    np.testing.assert_array_equal(released_test_indices(10, 8), np.linspace(0, 9, 8).astype(int))  # span too short
    np.testing.assert_array_equal(released_test_indices(8, 8), np.arange(8))
    rng = np.random.default_rng(0)
    starts, ends = set(), set()
    for _ in range(200):
        frames = released_train_indices(40, 8, rng)                       # pad = min(5, 16) = 5
        starts.add(int(frames[0])), ends.add(int(frames[-1]))
        assert np.all(np.diff(frames) >= 0)
    assert starts == set(range(6)) and ends == set(range(34, 40))
    np.testing.assert_array_equal(released_train_indices(9, 8, rng), np.linspace(0, 8, 8).astype(int))  # pad 0


def test_class_names_released_are_the_released_configs_lists():
    texts = {name: released_class_texts(name, shipped_classes(name)) for name in
             ("hmdb51", "ucf101", "kinetics100", "ssv2_small", "ssv2_full")}
    assert texts["hmdb51"]["draw_sword"] == "draw_sword" and texts["hmdb51"]["brush_hair"] == "brush hair"
    assert texts["ucf101"]["BlowDryHair"] == "Blow DryHair" and texts["ucf101"]["Archery"] == "Archery"
    assert texts["ssv2_small"]["train24"] == "Pouring [something] into [something]"      # train numbers from 24
    assert texts["kinetics100"]["hurling_(sport)"] == "hurling (sport)"
    for name, mapping in texts.items():
        classes = shipped_classes(name)
        assert set(mapping) == {c.key for c in classes if c.split != "val"}, name   # val: no released name
    hmdb = shipped_classes("hmdb51")
    train = [c for c in hmdb if c.split == "train"]
    with pytest.raises(DatasetError, match="do not fit these split files"):    # another order of the train classes
        released_class_texts("hmdb51", [*train[1:], train[0], *[c for c in hmdb if c.split != "train"]])


def test_extracting_with_released_class_names_encodes_them(tmp_path):
    """An hmdb51 root with a single test video: the class texts of every class are still encoded."""
    from clipspm.datasets.synthetic import write_video
    from tests.conftest import moving_bar_frames

    first = (Path(clipspm.__file__).parent / "datasets" / "splits" / "hmdb_ARN" / "testlist03.txt").read_text().split()[0]
    write_video(tmp_path / "hmdb" / f"{first}.avi", moving_bar_frames(12), codec="mpeg4")
    result = extract(ExtractOptions(dataset="hmdb51", root=tmp_path / "hmdb", splits=("test",), backbone=RN,
                                    pretrained="none", class_names="released", train_views=0, workers=0,
                                    cache_root=tmp_path / "caches", progress=False))
    assert result.done == 1 and "relnames" in result.path.name
    clip = load_clip(RN, "none")
    with FeatureCache(find_store(result.path)) as cache:
        keys, texts = cache.class_keys.tolist(), cache.class_texts.tolist()
        assert cache.meta["settings"]["class_names"] == "released" and cache.meta["class_names"] == "released"
        row = keys.index("draw_sword")
        assert texts[row] == "draw_sword" and texts[keys.index("cartwheel")] == "cartwheel"   # val: benchmark
        expected = clip.encode_texts([template.format("draw_sword") for template in cache.meta["templates"]])
        np.testing.assert_allclose(cache.text_features[row], expected.numpy(), rtol=1e-5, atol=1e-5)


def test_preparation_settings_address_new_caches_and_leave_old_addresses(video_root):
    base = ExtractOptions(dataset="custom", root=video_root, backbone=RN, pretrained="none")
    dataset = with_class_names(load_dataset("custom", video_root), "benchmark")
    plain = load_clip(RN, "none")
    default = content_settings(base, dataset, plain, view_settings(base, dataset, plain))
    assert not {"normalize", "sampling", "class_names"} & default.keys()   # the address caches always had
    released = ExtractOptions(dataset="custom", root=video_root, backbone=RN, pretrained="none", normalize="none",
                              sampling="released")
    raw = load_clip(RN, "none", normalize="none")
    settings = content_settings(released, dataset, raw, view_settings(released, dataset, raw))
    assert (settings["normalize"], settings["sampling"]) == ("none", "released")
    frames = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(raw.normalize(frames), frames.float() / 255, rtol=0, atol=0)   # [0, 1], as ToTensor


def test_import_eval_and_init_finetune(imported_rn, synthetic_root, rn_weights, tmp_path, monkeypatch):
    run, head, tower = imported_rn
    done = run_cli("eval", str(run), "--root", str(synthetic_root), "--pretrained", str(rn_weights), "--episodes", "20",
                   "--device", "cpu", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads((run / "results.json").read_text())
    assert result["episodes"] == 20 and 0 <= result["accuracy"] <= 1 and result["select_on"] == "test"
    assert Path(result["episodes_file"]).parent.parent == Path(result["cache"])   # beside the tuned test cache
    assert "on the TEST split" in " ".join(done.stdout.split())
    with FeatureCache(find_store(Path(result["cache"]))) as cache:           # the imported tower's test cache
        meta = cache.meta
        assert meta["normalize"] == {"kind": "none", "mean": [0.0] * 3, "std": [1.0] * 3}
        assert meta["settings"]["sampling"] == "released" and meta["settings"]["tuned_weights_sha256"]
        row = int(np.flatnonzero(cache.status == 1)[0])
        n = int(cache.array("num_source_frames")[row])
        np.testing.assert_array_equal(cache.array("frame_indices")[row, 0], released_test_indices(n, 8))

    seen = []
    original = finetune.load_views

    def spy(path, settings, rng, **kwargs):
        seen.append(settings.sampling)
        return original(path, settings, rng, **kwargs)

    monkeypatch.setattr(finetune, "load_views", spy)
    cfg = resolve_config("finetune", "synthetic", overrides=[
        *SHORT, f"data.root={synthetic_root}", f"data.pretrained={rn_weights}", f"data.cache_dir={tmp_path / 'caches'}",
        "train.lr=1e-12", "finetune.tower_lr=1e-12"])
    finetune.train_finetune(cfg, tmp_path / "ft", init=run, progress=False, device="cpu")
    ft = clipspm.load_run(tmp_path / "ft")
    assert (ft.config.data.backbone, ft.config.data.normalize, ft.config.data.sampling) == (RN, "none", "released")
    assert seen and set(seen) == {"released"}                                 # the decoded train views
    visual = load_file(str(tmp_path / "ft" / "checkpoints" / "best" / "visual.safetensors"))
    for key, value in tower.items():                                          # the tower started from the import
        if value.is_floating_point():
            torch.testing.assert_close(visual[key], value, rtol=0, atol=1e-6)
    for key, value in released_heads_state_dict(head).items():
        torch.testing.assert_close(ft.head.state_dict()[key], value, rtol=0, atol=1e-6)

    episode = Episode(support=torch.randn(2, 2, 8, 64), query=torch.randn(2, 2, 8, 64),
                      query_labels=torch.tensor([[0, 1], [0, 1]]), class_text=torch.randn(2, 2, 64),
                      class_ids=torch.tensor([[0, 1], [2, 3]]), shots=1)
    assert ft.head(episode).logits.shape == (2, 2, 2)
    ft.head.train()
    assert torch.isfinite(episode_step(ft.head, episode, ft.config.loss, 2).loss)


def test_training_into_an_imported_run_is_refused(imported_rn):
    run, _, _ = imported_rn
    with pytest.raises(ClipspmError, match="--init"):
        check_run_dir(run, "finetune", resume=False)


def test_init_refuses_settings_that_differ_from_the_imported_towers(imported_rn, synthetic_root, tmp_path):
    run, _, _ = imported_rn
    cfg = resolve_config("finetune", "synthetic", overrides=[*SHORT, "data.normalize=clip", f"data.root={synthetic_root}"])
    with pytest.raises(ClipspmError, match="data.normalize=clip"):
        finetune.train_finetune(cfg, tmp_path / "ft", init=run, progress=False, device="cpu")
    assert not (tmp_path / "ft").exists()


def test_load_run_gives_a_heads_runs_head_and_config(synthetic_root, rn_weights, tmp_path):
    from clipspm.stages.heads import train_heads
    from tests.conftest import heads_config

    cache = extract(ExtractOptions(dataset="synthetic", root=synthetic_root, backbone=RN, pretrained=str(rn_weights),
                                   train_views=0, workers=0, cache_root=tmp_path / "caches", progress=False))
    train_heads(heads_config(cache.path, "train.queries=1", "train.episodes=32", "train.val_every=32",
                             "train.val_episodes=10"), tmp_path / "run", progress=False, device="cpu")
    run = clipspm.load_run(tmp_path / "run")
    assert not run.head.training and run.config.model.kind == "clipspm" and "finetune" not in run.config
    episode = Episode(support=torch.randn(1, 5, 8, 64), query=torch.randn(1, 5, 8, 64),
                      query_labels=torch.arange(5)[None], class_text=torch.randn(1, 5, 64),
                      class_ids=torch.arange(5)[None], shots=1)
    assert run.head(episode).logits.shape == (1, 5, 5)


def test_views_of_released_sampling_decode_the_released_frames(video_root):
    from tests.test_extract import source_path

    path = source_path(video_root, "train_class_0/video0")
    settings = ViewSettings(num_segments=8, train_views=1, shorter_side=128, crop=112, hflip=True, sampling="released")
    views = load_views(path, settings, video_rng(0, "train_class_0/video0"))
    np.testing.assert_array_equal(views.frame_indices[0], released_test_indices(views.num_frames, 8))
