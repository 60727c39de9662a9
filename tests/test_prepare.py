"""Shard patterns and ``trainer.prepare`` for image folders, IDX files and existing shards."""
import gzip
import json
import struct

import numpy as np
import pytest
from PIL import Image

from trainer.data.shards import (ShardPatternError, count_samples, dataset_name, expand_patterns, iter_samples,
                                 key_to_id, sample_from_members)
from trainer.prepare import main as prepare_main
from trainer.prepare import prepare


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return str(path)


def test_expand_patterns_brace_glob_join_and_errors(tmp_path):
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar", "test-000000.tar.gz"):
        _touch(tmp_path / name)
    brace = expand_patterns(f"{tmp_path}/train-{{000000..000001}}.tar")
    assert [p.rsplit("/", 1)[1] for p in brace] == ["train-000000.tar", "train-000001.tar"]
    joined = expand_patterns(f"{tmp_path}/train-00000[2].tar::{tmp_path}/test-*.tar.gz")
    assert [p.rsplit("/", 1)[1] for p in joined] == ["train-000002.tar", "test-000000.tar.gz"]
    assert len(expand_patterns(str(tmp_path))) == 4
    with pytest.raises(ShardPatternError, match="matches no file"):
        expand_patterns(f"{tmp_path}/val-*.tar")
    with pytest.raises(ShardPatternError, match="does not exist"):
        expand_patterns(f"{tmp_path}/train-{{000000..000003}}.tar")


def _image_folder(root):
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 2)):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{name}{i}.png")
    (root / "train" / "cat" / "cat0.txt").write_text("a fluffy cat on a sofa\n")
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    return root


def test_prepare_image_folder_labels_captions_ids_and_corrupt_skip(tmp_path):
    source = _image_folder(tmp_path / "src")
    manifest = prepare(str(source), str(tmp_path / "out"), shard_size=4)
    assert manifest["classes"] == ["cat", "dog"]
    assert manifest["samples"] == {"train": 6, "test": 4}
    assert [s["samples"] for s in manifest["splits"]["train"]] == [4, 2]
    assert len(manifest["skipped"]) == 1 and "broken" in manifest["skipped"][0]["key"]
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["samples"] == manifest["samples"]
    samples = list(iter_samples(str(tmp_path / "out")))
    ids = sorted(s.sample_id for s in samples)
    assert ids == list(range(10))  # dense, unique across splits
    captions = {s.meta["source"]: s.caption for s in samples}
    assert captions["train/cat/cat0.png"] == "a fluffy cat on a sofa"
    assert captions["train/dog/dog1.png"] == "a photo of a dog."
    assert {s.label for s in samples if s.meta["label"] == "dog"} == {1}
    # Same source, same ids: stable.
    again = prepare(str(source), str(tmp_path / "again"), shard_size=4)
    assert [s.sample_id for s in iter_samples(str(tmp_path / "again"))] == [s.sample_id for s in samples]
    assert again["samples"] == manifest["samples"]


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_prepare_fashion_mnist_idx(tmp_path):
    source = tmp_path / "fashion-mnist"
    source.mkdir()
    rng = np.random.default_rng(0)
    _write_idx(source / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (7, 28, 28)))
    _write_idx(source / "train-labels-idx1-ubyte.gz", np.arange(7) % 10)
    _write_idx(source / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (3, 28, 28)))
    _write_idx(source / "t10k-labels-idx1-ubyte.gz", np.array([9, 8, 7]))
    manifest = prepare(str(source), str(tmp_path / "out"), shard_size=5)
    assert manifest["samples"] == {"train": 7, "test": 3}
    assert manifest["classes"][9] == "ankle boot"
    test = list(iter_samples(f"{tmp_path}/out/test-*.tar.gz"))
    assert [s.label for s in test] == [9, 8, 7]
    assert "ankle boot" in test[0].caption and test[0].image_ext == "png"
    assert [s.sample_id for s in test] == [7, 8, 9]
    assert count_samples(expand_patterns(f"{tmp_path}/out/train-*.tar.gz")) == 7


def test_prepare_existing_shards_adds_ids_and_keeps_members(tmp_path):
    source = _image_folder(tmp_path / "src")
    prepare(str(source), str(tmp_path / "first"), shard_size=100)
    manifest = prepare(f"{tmp_path}/first/train-*.tar.gz", str(tmp_path / "second"), shard_size=2)
    assert manifest["samples"] == {"train": 6}
    assert manifest["classes"] == ["cat", "dog"]
    samples = list(iter_samples(str(tmp_path / "second")))
    assert [s.sample_id for s in samples] == list(range(6))
    assert any(s.caption == "a fluffy cat on a sofa" for s in samples)


def test_sample_id_falls_back_to_a_stable_hash_of_dataset_and_key():
    assert key_to_id("test_000001", "cifar") == key_to_id("test_000001", "cifar") != key_to_id("test_000002", "cifar")
    assert key_to_id("000000000", "laion") != key_to_id("000000000", "cc3m")  # two img2dataset runs
    assert 0 <= key_to_id("anything", "") < 2**63


def test_dataset_name_is_the_directory_holding_the_shard():
    assert dataset_name("/data/laion-part1/00000.tar") == "laion-part1"
    assert dataset_name("s3://bucket/cc3m/00000.tar") == dataset_name("https://host/x/cc3m/00000.tar?sig=1") == "cc3m"
    assert dataset_name("pipe:aws s3 cp s3://bucket/yfcc/00000.tar.gz -") == "yfcc"
    samples = [sample_from_members("000000000", f"/d/{name}/00000.tar", {"jpg": b""}) for name in ("a", "b")]
    assert samples[0].sample_id != samples[1].sample_id  # the same key in two datasets
    explicit = sample_from_members("000000000", "/d/a/00000.tar", {"id": b"7", "json": b'{"caption": "x"}'})
    assert explicit.sample_id == 7 and explicit.caption == "x"
    both = sample_from_members("k", "/d/a/00000.tar", {"txt": b"from txt", "json": b'{"caption": "from json"}'})
    assert both.caption == "from txt"  # txt wins


def test_prepare_cli_reports_wrong_source(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare_main(["--source", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "does not exist" in capsys.readouterr().err
