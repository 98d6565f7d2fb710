"""Cache integrity: a damaged cache is named and refused, never read as zeros, and the command that
made it repairs exactly the damaged blocks."""

from __future__ import annotations

import logging
import shlex
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from clipspm.cache.checksum import BLOCK_ARRAYS
from clipspm.cache.inspect import verify
from clipspm.cache.store import FeatureCache, StoreWriter, find_store
from clipspm.errors import CacheError
from clipspm.stages.extract import ExtractOptions, extract
from clipspm.stages.heads import train_heads
from tests.conftest import heads_config, run_cli

TRAIN_BLOCK, TEST_BLOCK = 1, 14   # of the synthetic cache: 16 videos each, wholly in the train and the test split
SHORT_TRAIN = ["--episodes", "32", "--set", "train.val_every=32", "--set", "train.val_episodes=20", "--no-progress"]


def copy_cache(cache_dir: Path, tmp_path: Path) -> Path:
    """A copy to damage, under a cache root of its own: the address its extract command finds."""
    copy = tmp_path / "caches" / cache_dir.name
    shutil.copytree(cache_dir, copy)
    return copy


def same_extract(cache_dir: Path, **overrides) -> ExtractOptions:
    """The options that made the synthetic cache (tests/conftest.py), addressing `cache_dir`."""
    with FeatureCache(find_store(cache_dir)) as cache:
        root = Path(cache.meta["dataset_root"])
    return ExtractOptions(**{**dict(dataset="synthetic", root=root, cache_root=cache_dir.parent, train_views=2,
                                    workers=0, progress=False), **overrides})


def chunk_file(store: Path, name: str, block: int) -> Path:
    array = zarr.open_array(str(store / name), mode="r")
    return store / name / array.metadata.encode_chunk_key((block,) + (0,) * (array.ndim - 1))


def lose_chunk(store: Path, name: str, block: int) -> None:
    chunk_file(store, name, block).unlink()


def garble_chunk(store: Path, name: str, block: int) -> None:
    path = chunk_file(store, name, block)
    path.write_bytes(np.random.default_rng(block).bytes(path.stat().st_size))


def change_values(store: Path, name: str, block: int) -> None:
    """New values through Zarr itself: a valid chunk that no longer holds what extraction wrote."""
    array = zarr.open_array(str(store / name), mode="r+")
    rows = slice(block * 16, block * 16 + 16)
    array[rows] = array[rows] + 1


def assert_same_cache(repaired: Path, reference: Path) -> None:
    """Every array a block writes equals the reference's, and every block passes its check."""
    with FeatureCache(find_store(repaired)) as a, FeatureCache(find_store(reference)) as b:
        assert a.check() == []
        for name, dtype in BLOCK_ARRAYS.items():
            if name == "features":   # the encoder's float sums may differ with the thread count of the process
                np.testing.assert_allclose(a.numbers(name).astype(np.float32), b.numbers(name).astype(np.float32),
                                           rtol=1e-3, atol=1e-3)
            elif dtype is None:
                assert a.strings(name).tolist() == b.strings(name).tolist(), name
            else:
                np.testing.assert_array_equal(a.numbers(name), b.numbers(name), err_msg=name)
        np.testing.assert_array_equal(a.labels, b.labels)


def repair_command(message: str) -> list[str]:
    """The `clipspm extract ...` arguments a refusal names, as a user would copy them."""
    line = next(line for line in message.splitlines() if "clipspm extract" in line)
    return shlex.split(line[line.index("clipspm extract"):])[1:]


@pytest.fixture(scope="module")
def protonet_run(synthetic_cache, tmp_path_factory) -> Path:
    """A parameter-free run on the sound cache (nothing to train): something `eval` can score."""
    run = tmp_path_factory.mktemp("runs") / "protonet"
    train_heads(heads_config(synthetic_cache, "model.kind=protonet"), run, progress=False)
    return run


def test_every_finished_block_has_a_checksum_written_before_its_status(synthetic_cache, tmp_path, monkeypatch):
    with FeatureCache(find_store(synthetic_cache)) as cache:
        assert cache.has_checksums and (cache.numbers("checksums") >= 0).all()
        assert cache.check() == []
    store = copy_cache(synthetic_cache, tmp_path) / "features.zarr"
    with FeatureCache(store) as cache:
        arrays, damage = cache.read_blocks(TRAIN_BLOCK, TRAIN_BLOCK + 1)
    writes = []
    original = zarr.Array.__setitem__
    monkeypatch.setattr(zarr.Array, "__setitem__",
                        lambda array, key, value: (writes.append(array.basename), original(array, key, value))[1])
    with StoreWriter(store) as writer:
        writer.write_block(slice(16, 32), **arrays)
    assert writes[-2:] == ["checksums", "status"], writes   # a kill before the status leaves the block pending
    assert set(writes) == {*BLOCK_ARRAYS, "checksums"}


@pytest.mark.parametrize("damage, reason", [
    (lambda store: lose_chunk(store, "features", TRAIN_BLOCK), "lost its features chunk"),
    (lambda store: lose_chunk(store, "status", TRAIN_BLOCK), "lost its status chunk"),
    (lambda store: lose_chunk(store, "checksums", TRAIN_BLOCK), "lost its checksums chunk"),
    (lambda store: garble_chunk(store, "features", TRAIN_BLOCK), "cannot be read (features: RuntimeError: Zstd"),
    (lambda store: change_values(store, "features", TRAIN_BLOCK), "does not match its checksum (features)"),
], ids=["lost-features", "lost-status", "lost-checksums", "garbled-features", "changed-features"])
def test_check_names_the_damaged_block_and_loading_its_split_is_refused(synthetic_cache, tmp_path, damage, reason):
    store = copy_cache(synthetic_cache, tmp_path) / "features.zarr"
    damage(store)
    with FeatureCache(store) as cache:
        found = cache.check()
        assert [(item.block, item.rows) for item in found] == [(TRAIN_BLOCK, range(16, 32))], found
        assert reason in found[0].reason
        with pytest.raises(CacheError, match=rf"block {TRAIN_BLOCK} \(videos 16-31\)(.|\n)*clipspm extract "
                                             rf"--dataset synthetic"):
            cache.load_split("train")
        assert cache.load_split("test").features.shape[0] == 54   # what was not damaged still loads


@pytest.mark.parametrize("damage", [lose_chunk, garble_chunk], ids=["lost", "garbled"])
def test_damaged_zarr_cache_is_refused_by_verify_train_and_eval_and_its_command_repairs_exactly_those_blocks(
        synthetic_cache, protonet_run, tmp_path, damage):
    copy = copy_cache(synthetic_cache, tmp_path)
    damage(copy / "features.zarr", "features", TRAIN_BLOCK)
    damage(copy / "features.zarr", "features", TEST_BLOCK)

    verified = run_cli("cache", "verify", str(copy), cwd=tmp_path)
    assert verified.returncode == 1
    assert f"block {TRAIN_BLOCK} (videos 16-31)" in verified.stdout and f"block {TEST_BLOCK}" in verified.stdout
    trained = run_cli("train", "--stage", "heads", "--cache", str(copy), "--run-dir", str(tmp_path / "run"),
                      *SHORT_TRAIN, cwd=tmp_path)
    assert trained.returncode == 2 and "Traceback" not in trained.stderr
    assert f"block {TRAIN_BLOCK} (videos 16-31)" in trained.stderr and "clipspm extract" in trained.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
    evaluated = run_cli("eval", str(protonet_run), "--cache", str(copy), "--episodes", "50", "--no-progress",
                        cwd=tmp_path)
    assert evaluated.returncode == 2 and "Traceback" not in evaluated.stderr
    assert f"block {TEST_BLOCK} (videos 224-239)" in evaluated.stderr

    repaired = run_cli(*repair_command(trained.stderr), "--workers", "0", "--no-progress", cwd=tmp_path)
    assert repaired.returncode == 0, repaired.stderr[-2000:]
    assert "repaired 2 blocks (32 videos): encoded 32 videos" in repaired.stdout
    assert_same_cache(copy, synthetic_cache)
    again = run_cli(*repair_command(trained.stderr), "--workers", "0", "--no-progress", cwd=tmp_path)
    assert "reused the finished cache" in again.stdout


@pytest.fixture(scope="module")
def hdf5_cache(synthetic_cache, tmp_path_factory) -> Path:
    """The synthetic cache's settings, stored as HDF5."""
    return extract(same_extract(synthetic_cache, cache_root=tmp_path_factory.mktemp("hdf5"), format="hdf5")).path


def overwrite_values(store: Path, block: int) -> None:
    with h5py.File(store, "r+") as h5:
        h5["features"][block * 16] = h5["features"][block * 16 + 1]


def corrupt_bytes(store: Path, block: int) -> None:
    with h5py.File(store, "r") as h5:
        chunk = h5["features"].id.get_chunk_info_by_coord((block * 16, 0, 0, 0))
    with open(store, "r+b") as file:
        file.seek(chunk.byte_offset + 100)
        file.write(np.random.default_rng(0).bytes(64))


@pytest.mark.parametrize("damage", [overwrite_values, corrupt_bytes], ids=["overwritten", "corrupted-bytes"])
def test_damaged_hdf5_cache_is_found_refused_and_repaired(hdf5_cache, tmp_path, damage):
    copy = copy_cache(hdf5_cache, tmp_path)
    damage(copy / "features.h5", TRAIN_BLOCK)
    with FeatureCache(copy / "features.h5") as cache:
        assert f"block {TRAIN_BLOCK} (videos 16-31) does not match its checksum (features)" in verify(cache)
    trained = run_cli("train", "--stage", "heads", "--cache", str(copy), "--run-dir", str(tmp_path / "run"),
                      *SHORT_TRAIN, cwd=tmp_path)
    assert trained.returncode == 2 and "Traceback" not in trained.stderr
    assert f"block {TRAIN_BLOCK} (videos 16-31) does not match its checksum (features)" in trained.stderr
    assert "--format hdf5" in trained.stderr

    result = extract(same_extract(copy, format="hdf5"))
    assert not result.reused and result.repaired_blocks == 1 and result.encoded_now == 16
    assert_same_cache(copy, hdf5_cache)


def test_damaged_class_arrays_are_refused_on_opening_and_rewritten_by_extract(synthetic_cache, tmp_path):
    copy = copy_cache(synthetic_cache, tmp_path)
    labels = zarr.open_array(str(copy / "features.zarr" / "labels"), mode="r+")
    labels[:10] = labels[10:20]
    with pytest.raises(CacheError, match="labels does not match its checksum"):
        train_heads(heads_config(copy), tmp_path / "run", progress=False)
    result = extract(same_extract(copy))
    assert [item.array for item in result.repaired] == ["labels"] and result.encoded_now == 0
    assert_same_cache(copy, synthetic_cache)


def strip_checksums(store: Path) -> None:
    """What a cache made before checksums looks like."""
    root = zarr.open_group(str(store), mode="r+")
    meta = dict(root.attrs["clipspm"])
    del meta["checksums"], meta["extract_args"]
    root.attrs["clipspm"] = meta
    shutil.rmtree(store / "checksums")


def test_cache_made_before_checksums_loads_with_one_warning_and_extract_records_them(synthetic_cache, tmp_path,
                                                                                      caplog):
    copy = copy_cache(synthetic_cache, tmp_path)
    strip_checksums(copy / "features.zarr")
    with caplog.at_level(logging.WARNING), FeatureCache(copy / "features.zarr") as cache:
        assert not cache.has_checksums and cache.check() == []
        cache.load_split("train"), cache.load_split("val")
    assert sum("no checksums" in record.getMessage() for record in caplog.records) == 1

    result = extract(same_extract(copy))
    assert result.reused and result.encoded_now == 0 and result.checksums_recorded == 16
    assert_same_cache(copy, synthetic_cache)
    with FeatureCache(copy / "features.zarr") as cache:
        assert cache.has_checksums and cache.repair_command().startswith("clipspm extract --dataset synthetic")


def test_cache_made_before_checksums_with_a_lost_chunk_is_refused_and_repaired(synthetic_cache, tmp_path):
    copy = copy_cache(synthetic_cache, tmp_path)
    strip_checksums(copy / "features.zarr")
    lose_chunk(copy / "features.zarr", "features", TRAIN_BLOCK)
    with pytest.raises(CacheError, match=rf"block {TRAIN_BLOCK} \(videos 16-31\) has lost its features chunk"):
        train_heads(heads_config(copy), tmp_path / "run", progress=False)
    with FeatureCache(copy / "features.zarr") as cache, pytest.raises(CacheError, match="holds fill values"):
        cache.load_split("train")   # the same damage found by reading, without checksums

    result = extract(same_extract(copy))
    assert result.repaired_blocks == 1 and result.encoded_now == 16 and result.checksums_recorded == 15
    assert_same_cache(copy, synthetic_cache)


def test_training_from_the_cache_its_settings_address_repairs_its_lost_chunks_first(synthetic_cache, tmp_path):
    copy = copy_cache(synthetic_cache, tmp_path)
    lose_chunk(copy / "features.zarr", "features", TRAIN_BLOCK)
    cfg = heads_config(copy, "model.kind=protonet", "data.train_views=2", f"data.cache_dir={copy.parent}",
                       f"data.root={same_extract(copy).root}")
    cfg.data.cache = None   # no --cache: the stage extracts (here: repairs) the cache its data settings address
    train_heads(cfg, tmp_path / "run", progress=False)
    assert cfg.data.cache == str(copy.resolve())
    assert_same_cache(copy, synthetic_cache)
