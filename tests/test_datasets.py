"""The dataset registry: shipped splits, class texts, finding videos on disk, custom and synthetic datasets.

Video files here are empty placeholders: the registry only resolves paths, nothing decodes them.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import types
from pathlib import Path

import pytest

from clipspm.datasets import SPLITS, list_datasets, load_dataset
from clipspm.datasets.registry import SPLIT_ROOT, text_from_camel_case, text_from_folder_name
from clipspm.datasets.splits import read_split_file
from clipspm.errors import DatasetError

README_SIZES = {  # splits/README.md: train / val / test videos, then classes
    "hmdb51": ((4280, 1194, 1292), (31, 10, 10)),
    "ucf101": ((9154, 1421, 2745), (70, 10, 21)),
    "kinetics100": ((6400, 1200, 2400), (64, 12, 24)),
    "ssv2_small": ((6400, 1200, 2400), (64, 12, 24)),
    "ssv2_full": ((77500, 1926, 2857), (64, 12, 24)),
}
SPLIT_FOLDERS = {"hmdb51": "hmdb_ARN", "ucf101": "ucf_ARN", "kinetics100": "kinetics_CMN",
                 "ssv2_small": "ssv2_CMN", "ssv2_full": "ssv2_OTAM"}


def shipped_keys(name: str, split: str = "train") -> list[str]:
    return [line.key for line in read_split_file(SPLIT_ROOT / SPLIT_FOLDERS[name] / f"{split}list03.txt", split)]


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def frame_folder(path: Path) -> Path:
    touch(path / "img_00001.jpg")
    return path


def write_split_dir(folder: Path, **lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, entries in lines.items():
        (folder / f"{split}list01.txt").write_text("".join(f"{entry}\n" for entry in entries))
    return folder


@pytest.fixture
def scratch_dir(tmp_path):
    """A folder for tens of thousands of files: in memory (/dev/shm) where there is one, as disk is 5x slower."""
    if not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="clipspm-test-") as folder:
        yield Path(folder)


def test_benchmark_split_sizes_match_readme():
    infos = {info.name: info for info in list_datasets()}
    assert set(infos) == {*README_SIZES, "synthetic", "custom"}
    for name, (videos, classes) in README_SIZES.items():
        assert tuple(infos[name].videos[split] for split in SPLITS) == videos, name
        assert tuple(infos[name].classes[split] for split in SPLITS) == classes, name


def test_hmdb51_loads_every_entry_of_a_complete_root(scratch_dir):
    for split in SPLITS:
        for key in shipped_keys("hmdb51", split):
            touch(scratch_dir / f"{key}.avi")
    dataset = load_dataset("hmdb51", scratch_dir)
    assert [len(dataset.videos_in(split)) for split in SPLITS] == [4280, 1194, 1292]
    assert [len(dataset.classes_in(split)) for split in SPLITS] == [31, 10, 10]
    assert not dataset.missing()
    assert dataset.videos[0].key == "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0"
    assert dataset.videos[0].path == scratch_dir.resolve() / "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi"
    assert (dataset.hflip, dataset.default_backbone, dataset.default_pretrained) == (True, "RN50", "openai")


def test_class_text_rules(tmp_path):
    for name in README_SIZES:
        touch(tmp_path / name / f"{shipped_keys(name, 'val')[0]}.mp4")
    texts = {name: {entry.key: entry.text for entry in load_dataset(name, tmp_path / name, splits=("val",)).classes}
             for name in README_SIZES}
    assert texts["hmdb51"]["brush_hair"] == "brush hair"
    assert texts["kinetics100"]["hurling_(sport)"] == "hurling (sport)"
    assert texts["ssv2_small"]["train24"] == "Pouring something into something"
    assert texts["ssv2_full"]["train24"] == "Pouring something into something until it overflows"
    ucf = texts["ucf101"]
    assert len(ucf) == 101
    assert ucf["BlowingCandles"] == "blowing candles"
    assert ucf["YoYo"] == "yo yo"
    assert ucf["PlayingDaf"] == "playing daf"
    assert ucf["JumpingJack"] == "jumping jack"
    assert ucf["HandstandPushups"] == "handstand pushups"
    assert all(text == text.lower() and "  " not in text for text in ucf.values())
    assert text_from_camel_case("PlayingTV") == "playing tv"
    assert text_from_folder_name("pick-up_BoxFast") == "pick up box fast"


def test_classes_do_not_depend_on_the_loaded_splits(tmp_path):
    test_key = shipped_keys("hmdb51", "test")[0]
    touch(tmp_path / f"{test_key}.avi")
    everything = load_dataset("hmdb51", tmp_path)
    test_only = load_dataset("hmdb51", tmp_path, splits=("test",))
    assert test_only.classes == everything.classes
    assert test_only.class_index() == everything.class_index()
    assert [entry.split for entry in everything.classes] == ["train"] * 31 + ["val"] * 10 + ["test"] * 10
    assert {video.split for video in test_only.videos} == {"test"}
    assert test_only.videos == everything.videos_in("test")
    assert test_only.split_hash == everything.split_hash


def test_resolves_video_files_and_frame_folders(tmp_path):
    keys = shipped_keys("hmdb51")[:6]
    avi = touch(tmp_path / f"{keys[0]}.avi")
    upper = touch(tmp_path / f"{keys[1]}.MP4")
    frames = frame_folder(tmp_path / keys[2])
    (tmp_path / keys[3]).mkdir()
    in_split_folder = touch(tmp_path / "train" / f"{keys[4]}.webm")
    in_other_split_folder = frame_folder(tmp_path / "test" / keys[5])
    touch(tmp_path / f"{keys[0]}.mkv")
    paths = {video.key: video for video in load_dataset("hmdb51", tmp_path).videos}
    root = tmp_path.resolve()
    assert paths[keys[0]].path == root / avi.relative_to(tmp_path)  # .avi preferred over .mkv
    assert paths[keys[1]].path == root / upper.relative_to(tmp_path)
    assert paths[keys[2]].path == root / frames.relative_to(tmp_path) and paths[keys[2]].path.is_dir()
    assert paths[keys[3]].path is None and "has no jpg/jpeg/png images" in paths[keys[3]].problem
    assert paths[keys[4]].path == root / in_split_folder.relative_to(tmp_path)
    assert paths[keys[5]].path == root / in_other_split_folder.relative_to(tmp_path)


def test_kinetics_id_prefix(tmp_path):
    keys = shipped_keys("kinetics100")[:4]
    clip = touch(tmp_path / f"{keys[0]}_000012_000022.mp4")
    plain = touch(tmp_path / f"{keys[1]}.mp4")
    frames = frame_folder(tmp_path / f"{keys[2]}_000001_000011")
    touch(tmp_path / f"{keys[3]}_trailer.mp4")
    videos = {video.key: video for video in load_dataset("kinetics100", tmp_path).videos}
    root = tmp_path.resolve()
    assert videos[keys[0]].path == root / clip.relative_to(tmp_path)
    assert videos[keys[1]].path == root / plain.relative_to(tmp_path)
    assert videos[keys[2]].path == root / frames.relative_to(tmp_path)
    assert videos[keys[3]].path is None
    assert "_{start:06d}_{end:06d}" in videos[keys[3]].problem


def test_ssv2_flat_layout(tmp_path):
    test_keys = shipped_keys("ssv2_small", "test")[:4]
    ids = [key.split("/")[1] for key in test_keys]
    flat = touch(tmp_path / f"{ids[0]}.webm")
    reencoded = touch(tmp_path / "mp4" / f"{ids[1]}.mp4")
    frames = frame_folder(tmp_path / "frames" / ids[2])
    touch(tmp_path / "a" / f"{ids[3]}.webm")
    touch(tmp_path / "b" / f"{ids[3]}.webm")
    dataset = load_dataset("ssv2_small", tmp_path, splits=("test",))
    videos = {video.key: video for video in dataset.videos}
    root = tmp_path.resolve()
    assert videos[test_keys[0]].path == root / flat.name
    assert videos[test_keys[1]].path == root / reencoded.relative_to(tmp_path)
    assert videos[test_keys[2]].path == root / frames.relative_to(tmp_path)
    assert videos[test_keys[3]].path is None and "matches 2 places" in videos[test_keys[3]].problem
    assert dataset.hflip is False


def test_ssv2_full_resolution_is_not_quadratic(scratch_dir):
    """82k entries against a flat folder: one index of the tree, then dictionary look-ups."""
    for split in SPLITS:
        for key in shipped_keys("ssv2_full", split):
            os.mknod(scratch_dir / f"{key.split('/')[1]}.webm")  # an empty file, twice as fast as open()
    dataset = load_dataset("ssv2_full", scratch_dir)
    assert [len(dataset.videos_in(split)) for split in SPLITS] == [77500, 1926, 2857]
    assert not dataset.missing()


def test_missing_entry_is_recorded_not_raised(tmp_path):
    keys = shipped_keys("hmdb51")
    touch(tmp_path / f"{keys[0]}.avi")
    dataset = load_dataset("hmdb51", tmp_path)
    missing = {video.key: video for video in dataset.missing()}
    assert len(missing) == 4280 + 1194 + 1292 - 1
    problem = missing[keys[1]].problem
    assert problem.startswith(f"no video file or frame folder for {keys[1]!r} under {tmp_path.resolve()}")
    assert f"{keys[1]}.avi|.mp4" in problem and f"{keys[1]}/ with frames" in problem


def test_missing_root_names_the_fix(tmp_path):
    with pytest.raises(DatasetError, match="--root"):
        load_dataset("hmdb51")
    with pytest.raises(DatasetError, match=r"does not exist.*--root"):
        load_dataset("hmdb51", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=r"not a folder.*--root"):
        load_dataset("hmdb51", touch(tmp_path / "file.avi"))


def test_wrong_root_shows_the_expected_layout(tmp_path):
    touch(tmp_path / "hmdb51" / "brush_hair" / "April_09_brush_hair_u_nm_np1_ba_goo_0.avi")
    with pytest.raises(DatasetError) as error:
        load_dataset("hmdb51", tmp_path)
    message = str(error.value)
    assert "wrong folder" in message and "The root holds: hmdb51" in message
    assert str(tmp_path.resolve() / "brush_hair" / "April_09_brush_hair_u_nm_np1_ba_goo_0") in message


@pytest.mark.parametrize("entry", ["../outside/video", "a/../../etc", "/etc/passwd", "a\\..\\b/c",
                                   "a/b/c", "justonename", "a/", "./a", "a/b\x00"])
def test_split_entry_leaving_root_is_refused(tmp_path, entry):
    touch(tmp_path / "root" / "ok" / "v1.mp4")
    split_dir = write_split_dir(tmp_path / "splits", test=["ok/v1", entry])
    with pytest.raises(DatasetError, match=r"testlist01\.txt line 2"):
        load_dataset("custom", tmp_path / "root", split_dir=split_dir)


def test_symlink_leaving_root_is_followed_for_clean_entries(tmp_path):
    touch(tmp_path / "elsewhere" / "v1.mp4")
    (tmp_path / "root").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "root" / "jump")
    split_dir = write_split_dir(tmp_path / "splits", test=["jump/v1"])
    dataset = load_dataset("custom", tmp_path / "root", split_dir=split_dir)
    assert dataset.videos[0].path == tmp_path.resolve() / "root" / "jump" / "v1.mp4"


def test_duplicate_entry_is_refused(tmp_path):
    touch(tmp_path / "root" / "a" / "v1.mp4")
    split_dir = write_split_dir(tmp_path / "splits", train=["a/v1", "a/v2", "a/v1"])
    with pytest.raises(DatasetError, match=r"trainlist01\.txt: 'a/v1' appears on line 1 and again on line 3"):
        load_dataset("custom", tmp_path / "root", split_dir=split_dir)


def test_video_in_two_splits_is_refused(tmp_path):
    touch(tmp_path / "root" / "a" / "v1.mp4")
    split_dir = write_split_dir(tmp_path / "splits", train=["a/v1"], test=["a/v1"])
    with pytest.raises(DatasetError, match=r"train split .*trainlist01\.txt line 1.* test split .*line 1"):
        load_dataset("custom", tmp_path / "root", split_dir=split_dir)


def test_class_in_two_splits_is_refused(tmp_path):
    touch(tmp_path / "root" / "a" / "v1.mp4")
    split_dir = write_split_dir(tmp_path / "splits", train=["a/v1"], test=["a/v2"])
    with pytest.raises(DatasetError, match="disjoint classes"):
        load_dataset("custom", tmp_path / "root", split_dir=split_dir)


def test_empty_split_file_is_refused(tmp_path):
    touch(tmp_path / "root" / "a" / "v1.mp4")
    split_dir = write_split_dir(tmp_path / "splits", train=["a/v1"], test=[])
    with pytest.raises(DatasetError, match=r"testlist01\.txt has no entries"):
        load_dataset("custom", tmp_path / "root", split_dir=split_dir)


def test_custom_with_split_files(tmp_path):
    root = tmp_path / "root"
    touch(root / "pick-up_Box" / "v1.mp4")
    frame_folder(root / "pick-up_Box" / "v2")
    touch(root / "Waving" / "w1.avi")
    split_dir = write_split_dir(tmp_path / "splits", train=["pick-up_Box/v1", "pick-up_Box/v2"],
                                test=["Waving/w1", "Waving/w2"])
    dataset = load_dataset("custom", root, split_dir=split_dir)
    assert [(entry.key, entry.text, entry.split) for entry in dataset.classes] == [
        ("pick-up_Box", "pick up box", "train"), ("Waving", "waving", "test")]
    assert [video.path is not None for video in dataset.videos] == [True, True, True, False]
    assert (dataset.hflip, dataset.default_backbone, dataset.default_pretrained) == (True, "RN50", "openai")


def test_split_entries_written_with_their_video_extension_resolve(tmp_path):
    """UCF101's official lists name `CLASS/VIDEO.avi`: the file named is found, a transcoded copy when it is
    not there, and a frame folder named with the extension too."""
    root = tmp_path / "root"
    named = touch(root / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g08_c01.avi")
    touch(root / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g08_c01.mkv")
    named_mp4 = touch(root / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g08_c02.mp4")
    touch(root / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g08_c02.avi")
    transcoded = touch(root / "Archery" / "v_Archery_g01_c01.mp4")
    frames = frame_folder(root / "Archery" / "v_Archery_g01_c02.avi")
    split_dir = write_split_dir(tmp_path / "splits",
                                train=["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi",
                                       "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c02.mp4"],
                                test=["Archery/v_Archery_g01_c01.avi", "Archery/v_Archery_g01_c02.avi",
                                      "Archery/v_Archery_g01_c03.avi"])
    videos = {video.key: video for video in load_dataset("custom", root, split_dir=split_dir).videos}
    resolved = root.resolve()
    assert videos["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi"].path == resolved / named.relative_to(root)
    assert videos["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c02.mp4"].path == resolved / named_mp4.relative_to(root)
    assert videos["Archery/v_Archery_g01_c01.avi"].path == resolved / transcoded.relative_to(root)
    assert videos["Archery/v_Archery_g01_c02.avi"].path == resolved / frames.relative_to(root)
    missing = videos["Archery/v_Archery_g01_c03.avi"]
    assert missing.path is None and "v_Archery_g01_c03.avi" in missing.problem


def test_custom_with_split_folders(tmp_path):
    touch(tmp_path / "train" / "Jumping" / "j1.mp4")
    touch(tmp_path / "train" / "Jumping" / "j2.MOV")
    touch(tmp_path / "train" / "Jumping" / "notes.txt")
    frame_folder(tmp_path / "val" / "sitting_down" / "s1")
    touch(tmp_path / "test" / "waving" / "w1.webm")
    dataset = load_dataset("custom", tmp_path)
    assert [(entry.key, entry.split) for entry in dataset.classes] == [
        ("Jumping", "train"), ("sitting_down", "val"), ("waving", "test")]
    assert [video.key for video in dataset.videos] == ["Jumping/j1", "Jumping/j2", "sitting_down/s1", "waving/w1"]
    assert dataset.videos[2].path == tmp_path.resolve() / "val" / "sitting_down" / "s1"
    assert load_dataset("custom", tmp_path, splits=("test",)).classes == dataset.classes


def test_custom_class_folders_are_all_test(tmp_path):
    touch(tmp_path / "brushing_teeth" / "a.mp4")
    touch(tmp_path / "brushing_teeth" / "a.avi")
    touch(tmp_path / "PlayingCello" / "b.mkv")
    dataset = load_dataset("custom", tmp_path)
    assert [(entry.key, entry.text, entry.split) for entry in dataset.classes] == [
        ("PlayingCello", "playing cello", "test"), ("brushing_teeth", "brushing teeth", "test")]
    assert [video.path.name for video in dataset.videos] == ["b.mkv", "a.avi"]
    with pytest.raises(DatasetError, match=r"no videos in the requested splits \['train'\]; it has: test"):
        load_dataset("custom", tmp_path, splits=("train",))


def test_custom_class_folder_without_videos_is_refused(tmp_path):
    touch(tmp_path / "waving" / "w1.mp4")
    touch(tmp_path / "empty" / "readme.txt")
    with pytest.raises(DatasetError, match=r"class folder .*empty holds no video files"):
        load_dataset("custom", tmp_path)


def test_custom_split_dir_with_two_train_lists_is_refused(tmp_path):
    touch(tmp_path / "root" / "a" / "v1.mp4")
    split_dir = write_split_dir(tmp_path / "splits", train=["a/v1"])
    (split_dir / "trainlist02.txt").write_text("a/v1\n")
    with pytest.raises(DatasetError, match="several train split files"):
        load_dataset("custom", tmp_path / "root", split_dir=split_dir)


def test_synthetic_generates_then_loads(tmp_path, monkeypatch):
    calls = []

    def ensure_synthetic(root: Path, seed: int = 0) -> Path:
        calls.append((root, seed))
        classes = {"left": "moving left", "right": "moving right", "up": "moving up"}
        for split, class_key in zip(SPLITS, classes):
            for video in ("v0", "v1"):
                touch(root / class_key / f"{video}.mp4")
            touch(root / "splits" / f"{split}list.txt").write_text(f"{class_key}/v0\n{class_key}/v1\n")
        (root / "classes.json").write_text(json.dumps(classes))
        return root

    generator = types.ModuleType("clipspm.datasets.synthetic")
    generator.ensure_synthetic = ensure_synthetic
    monkeypatch.setitem(sys.modules, "clipspm.datasets.synthetic", generator)
    monkeypatch.chdir(tmp_path)
    dataset = load_dataset("synthetic", seed=3)
    assert calls == [(Path("data") / "synthetic-seed3", 3)]
    assert dataset.root == tmp_path.resolve() / "data" / "synthetic-seed3"
    assert [(entry.key, entry.text, entry.split) for entry in dataset.classes] == [
        ("left", "moving left", "train"), ("right", "moving right", "val"), ("up", "moving up", "test")]
    assert len(dataset.videos) == 6 and not dataset.missing()
    assert (dataset.hflip, dataset.default_backbone, dataset.default_pretrained) == (
        False, "clipspm-tiny-vit", "none")


def test_split_hash_identifies_the_split_definition(tmp_path):
    touch(tmp_path / "a" / "v1.mp4")
    touch(tmp_path / "b" / "v2.mp4")
    first = write_split_dir(tmp_path / "one", train=["a/v1"], test=["b/v2"])
    same = write_split_dir(tmp_path / "two", train=["a/v1"], test=["b/v2"])
    swapped = write_split_dir(tmp_path / "three", train=["b/v2"], test=["a/v1"])
    hashes = [load_dataset("custom", tmp_path, split_dir=folder).split_hash for folder in (first, same, swapped)]
    assert hashes[0] == hashes[1] != hashes[2]
    assert len(hashes[0]) == 64 and int(hashes[0], 16) >= 0


def test_unknown_dataset_and_split_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset 'hmdb'; choose one of hmdb51"):
        load_dataset("hmdb", tmp_path)
    with pytest.raises(DatasetError, match="splits must be"):
        load_dataset("hmdb51", tmp_path, splits=("training",))
