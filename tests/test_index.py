"""index.build and index.search over shard images: the chosen exact index, metadata, atomic writes, errors.

Index choice, tuning, updates, merging and evaluation on generated vectors: ``test_index_scale.py``."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import index.sources as sources_module
from export.runtime import Encoder, EncoderError
from index.build import build_index, main
from index.search import Index, IndexLoadError, ShardCache
from index.store import data_files, read_info
from onnx_fixtures import (
    CIFAR_DIR,
    CIFAR_SKIP_REASON,
    CLASSES,
    add_int8_variant,
    cifar_subset_shard,
    make_onnx_dir,
    make_shard,
    random_images,
    shared_onnx_dir,
)
from trainer.data.shards import ShardPatternError

FIRST, SECOND, CORRUPT = 60, 40, 7  # samples per shard; index (in the second shard) of the garbage jpg


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> Path:
    return shared_onnx_dir(tmp_path_factory, with_text=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Two generated shards: ids 0..59 and 60..99, with sample 67 an unreadable jpg."""
    directory = tmp_path_factory.mktemp("shards")
    make_shard(directory / "part-000000.tar", count=FIRST, start=0, seed=1)
    make_shard(directory / "part-000001.tar.gz", count=SECOND, start=FIRST, seed=2, corrupt_keys=(CORRUPT,))
    return directory


@pytest.fixture(scope="module")
def built(onnx_dir: Path, shards: Path, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("index")
    info = build_index(onnx_dir, str(shards / "part-*.tar*"), output, batch_size=16, progress=False)
    return output, info


@pytest.fixture(scope="module")
def loaded(built) -> Index:
    return Index.load(built[0])


def _files(directory: Path) -> dict[str, Path]:
    """The data files the committed ``index.json`` names."""
    return data_files(directory, read_info(directory))


def _names(directory: Path) -> list[str]:
    """Visible files, with the generation tag masked."""
    return sorted(re.sub(r"-\d{6}-[0-9a-f]{6}", "-GEN", p.name) for p in directory.iterdir() if not p.name.startswith("."))


def _all_images() -> dict[int, object]:
    """The generated images by sample id, as make_shard wrote them (minus the corrupt one)."""
    images = dict(enumerate(random_images(FIRST, seed=1)))
    images.update({FIRST + i: image for i, image in enumerate(random_images(SECOND, seed=2)) if i != CORRUPT})
    return images


def test_build_writes_all_files(built, onnx_dir: Path, shards: Path) -> None:
    output, info = built
    assert _names(output) == ["index-GEN.faiss", "index.json", "metadata-GEN.parquet"]
    on_disk = json.loads((output / "index.json").read_text())
    assert on_disk == info
    assert info["factory"] == "Flat" and info["metric"] == "inner_product"
    assert info["dim"] == 16
    assert info["count"] == FIRST + SECOND - 1
    assert info["skipped"] == 1 and info["skipped_keys"] == [f"sample_{FIRST + CORRUPT:06d}"]
    assert info["encoder"] == str(onnx_dir.resolve())
    assert info["encoder_model"]["objective"] == "fixture"
    assert info["data"] == str(shards / "part-*.tar*")
    assert info["has_text"] is True
    assert info["build_seconds"] >= 0 and info["created"]
    assert info["recall"]["recall"] == pytest.approx(1.0)
    assert info["family"] == "flat" and info["search_params"] == {} and info["train_size"] == 0
    assert "exact search is cheap" in info["choice"]["reason"]
    assert len(info["encoder_fingerprint"]) == 64


def test_metadata_columns(built, shards: Path) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(_files(built[0])["metadata"])
    assert table.column_names == ["id", "key", "shard", "label", "label_name", "caption"]
    assert str(table.schema.field("id").type) == "int64" and str(table.schema.field("label").type) == "int64"
    rows = table.to_pylist()
    assert [row["id"] for row in rows] == [i for i in range(FIRST + SECOND) if i != FIRST + CORRUPT]
    first = rows[0]
    assert first["key"] == "sample_000000"
    assert first["shard"] == str((shards / "part-000000.tar").resolve())
    assert first["label"] == 0 and first["label_name"] == CLASSES[0]
    assert first["caption"] == f"a photo of {CLASSES[0]} number 0"


def test_search_is_exact(loaded: Index, onnx_dir: Path) -> None:
    images = _all_images()
    ids = np.array(sorted(images), dtype=np.int64)
    vectors = Encoder(onnx_dir).encode_images([images[i] for i in ids])
    queries = vectors[::9]
    scores, found = loaded.search(queries, k=10)
    assert scores.dtype == np.float32 and found.dtype == np.int64 and found.shape == (len(queries), 10)
    brute = queries @ vectors.T
    order = np.argsort(-brute, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(found, ids[order])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, order, axis=1), atol=1e-5)


def test_query_image_finds_itself_first(loaded: Index, onnx_dir: Path) -> None:
    encoder = Encoder(onnx_dir)
    for sample_id in (0, 33, FIRST + 1, FIRST + SECOND - 1):
        image = loaded.image(sample_id)
        scores, found = loaded.search(encoder.encode_images([image]), k=3)
        assert found[0, 0] == sample_id
        assert scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_k_is_clamped_and_single_vector_accepted(loaded: Index) -> None:
    query = np.ones(16, dtype=np.float32) / 4.0
    scores, found = loaded.search(query, k=10_000)
    assert found.shape == (1, loaded.count) and scores.shape == (1, loaded.count)
    assert sorted(found[0].tolist()) == sorted(loaded.ids.tolist())
    with pytest.raises(ValueError, match="k must be"):
        loaded.search(query, k=0)


def test_search_dim_mismatch(loaded: Index) -> None:
    with pytest.raises(ValueError, match=r"query dimension 8 .* index dimension 16"):
        loaded.search(np.zeros((2, 8), dtype=np.float32), k=1)


def test_records_and_images(loaded: Index) -> None:
    assert (loaded.dim, loaded.count, len(loaded)) == (16, FIRST + SECOND - 1, FIRST + SECOND - 1)
    records = loaded.records([5, -1, FIRST + 2])
    assert [r["id"] for r in records] == [5, FIRST + 2]
    assert records[1]["key"] == f"sample_{FIRST + 2:06d}"
    assert records[1]["label_name"] == CLASSES[(2) % len(CLASSES)]
    with pytest.raises(KeyError, match="12345"):
        loaded.records([12345])
    original = _all_images()[FIRST + 2]
    np.testing.assert_array_equal(np.asarray(loaded.image(FIRST + 2)), np.asarray(original))


def test_shard_cache_is_lru(shards: Path) -> None:
    cache = ShardCache(max_shards=1)
    first = cache.images(str(shards / "part-000000.tar"))
    assert len(first) == FIRST
    second = cache.images(str(shards / "part-000001.tar.gz"))
    assert len(second) == SECOND  # the corrupt member is still bytes; decoding happens later
    assert len(cache) == 1
    with pytest.raises(FileNotFoundError, match="gone.tar"):
        cache.images(str(shards / "gone.tar"))


def test_limit(onnx_dir: Path, shards: Path, tmp_path: Path) -> None:
    info = build_index(onnx_dir, str(shards / "part-000000.tar"), tmp_path / "index", limit=10, progress=False)
    assert info["count"] == 10
    assert Index.load(tmp_path / "index").ids.tolist() == list(range(10))


def test_cli(onnx_dir: Path, shards: Path, tmp_path: Path, capsys) -> None:
    code = main(["--encoder", str(onnx_dir), "--data", str(shards / "part-000000.tar"), "--output", str(tmp_path / "ix"),
                 "--batch-size", "32", "--no-progress"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["count"] == FIRST
    code = main(["--encoder", str(onnx_dir), "--data", str(tmp_path / "none-*.tar"), "--output", str(tmp_path / "ix2")])
    assert code == 2
    assert "none-*.tar" in capsys.readouterr().err


# -- errors ---------------------------------------------------------------------------------------


def test_no_shards_matched(onnx_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardPatternError, match="nothing-here"):
        build_index(onnx_dir, str(tmp_path / "nothing-here-*.tar"), tmp_path / "index", progress=False)


def test_empty_collection(onnx_dir: Path, tmp_path: Path) -> None:
    shard = make_shard(tmp_path / "bad" / "all-bad.tar", count=3, corrupt_keys=(0, 1, 2))
    with pytest.raises(ValueError, match=r"empty collection.*3 sample\(s\) skipped"):
        build_index(onnx_dir, str(shard), tmp_path / "index", progress=False)
    assert not (tmp_path / "index" / "index.json").exists()


def test_duplicate_ids(onnx_dir: Path, shards: Path, tmp_path: Path) -> None:
    spec = f"{shards / 'part-000000.tar'}::{shards / 'part-000000.tar'}"
    with pytest.raises(ValueError, match=r"duplicate sample id \d+: key .*part-000000.tar and key "
                                         r".*part-000000.tar.*trainer.prepare"):
        build_index(onnx_dir, spec, tmp_path / "index", progress=False)


def test_encoder_dim_mismatch(shards: Path, tmp_path: Path) -> None:
    bad = make_onnx_dir(tmp_path / "onnx", with_text=False, dim=16, embed_dim=12)
    with pytest.raises(EncoderError, match="embed_dim=12"):
        build_index(bad, str(shards / "part-000000.tar"), tmp_path / "index", progress=False)


def test_missing_encoder(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing-onnx"):
        build_index(tmp_path / "missing-onnx", str(shards / "part-000000.tar"), tmp_path / "index", progress=False)


def test_load_missing(tmp_path: Path, built) -> None:
    with pytest.raises(FileNotFoundError, match="no-index"):
        Index.load(tmp_path / "no-index")
    copy = Path(shutil.copytree(built[0], tmp_path / "copy"))
    _files(copy)["metadata"].unlink()
    with pytest.raises(FileNotFoundError, match=r"metadata-.*\.parquet"):
        Index.load(copy)


def test_load_corrupt_index(tmp_path: Path, built) -> None:
    copy = Path(shutil.copytree(built[0], tmp_path / "copy"))
    faiss_file = _files(copy)["index"]
    data = faiss_file.read_bytes()
    faiss_file.write_bytes(data[: len(data) // 3])
    with pytest.raises(IndexLoadError, match=r"index-.*\.faiss"):
        Index.load(copy)
    faiss_file.write_bytes(b"garbage")
    with pytest.raises(IndexLoadError, match="corrupt"):
        Index.load(copy)


def test_load_dim_mismatch(tmp_path: Path, built) -> None:
    copy = Path(shutil.copytree(built[0], tmp_path / "copy"))
    info = json.loads((copy / "index.json").read_text())
    info["dim"] = 32
    (copy / "index.json").write_text(json.dumps(info))
    with pytest.raises(IndexLoadError, match=r"dim=32 .* 16-dimensional"):
        Index.load(copy)


# -- atomic writes --------------------------------------------------------------------------------


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.name != ".lock"}


def test_failed_build_mid_stream_keeps_previous_index(onnx_dir: Path, shards: Path, built, tmp_path: Path, monkeypatch) -> None:
    target = Path(shutil.copytree(built[0], tmp_path / "index"))
    before = _snapshot(target)
    real_embed = sources_module.embed_batch
    calls = {"n": 0}

    def failing_embed(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash while embedding")
        return real_embed(*args, **kwargs)

    monkeypatch.setattr(sources_module, "embed_batch", failing_embed)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_index(onnx_dir, str(shards / "part-*.tar*"), target, batch_size=16, progress=False)
    assert _snapshot(target) == before


def test_failed_write_keeps_previous_index_and_cleans_up(onnx_dir: Path, shards: Path, built, tmp_path: Path, monkeypatch) -> None:
    import pyarrow.parquet as pq

    target = Path(shutil.copytree(built[0], tmp_path / "index"))
    before = _snapshot(target)

    def failing_write(*args, **kwargs):
        raise OSError("simulated disk full while writing metadata")

    # the new generation's index file is already written when the metadata write fails.
    monkeypatch.setattr(pq, "write_table", failing_write)
    with pytest.raises(OSError, match="disk full"):
        build_index(onnx_dir, str(shards / "part-000000.tar"), target, progress=False)
    assert _snapshot(target) == before  # same files, same bytes, no temporaries left behind
    Index.load(target)


def test_rebuild_replaces_index(onnx_dir: Path, shards: Path, built, tmp_path: Path) -> None:
    target = Path(shutil.copytree(built[0], tmp_path / "index"))
    build_index(onnx_dir, str(shards / "part-000000.tar"), target, progress=False)
    assert Index.load(target).count == FIRST
    assert _names(target) == ["index-GEN.faiss", "index.json", "metadata-GEN.parquet"]  # the old generation is gone


# -- real data ------------------------------------------------------------------------------------


@pytest.mark.skipif(not CIFAR_DIR.is_dir(), reason=CIFAR_SKIP_REASON)
def test_cifar_subset(onnx_dir: Path, tmp_path: Path) -> None:
    shard = cifar_subset_shard(tmp_path / "cifar" / "test-000000.tar", count=300)
    info = build_index(onnx_dir, str(tmp_path / "cifar" / "test-*.tar"), tmp_path / "index", batch_size=128, progress=False)
    assert info["count"] == 300 and info["skipped"] == 0
    index = Index.load(tmp_path / "index")
    classes = json.loads((CIFAR_DIR / "manifest.json").read_text())["classes"]
    records = index.records(index.ids)
    assert all(r["label_name"] == classes[r["label"]] for r in records)
    assert all(r["shard"] == str(shard.resolve()) for r in records)
    encoder = Encoder(onnx_dir)
    probe = [int(i) for i in index.ids[::50]]
    scores, found = index.search(encoder.encode_images([index.image(i) for i in probe]), k=1)
    for sample_id, top_id, top_score in zip(probe, found[:, 0], scores[:, 0]):
        # Exact duplicates could tie; the self-match must score 1 either way.
        assert top_id == sample_id or top_score == pytest.approx(1.0, abs=1e-5)
    assert os.path.getsize(_files(tmp_path / "index")["index"]) > 0


def test_gpu_request_matches_cpu(onnx_dir: Path, shards: Path, loaded: Index, tmp_path: Path) -> None:
    """Asking for the GPU builds and searches on it when faiss sees one, and falls back to CPU otherwise."""
    import faiss

    info = build_index(onnx_dir, str(shards / "part-*.tar*"), tmp_path / "index", progress=False, use_gpu=True)
    assert info["count"] == loaded.count and info["recall"]["recall"] == pytest.approx(1.0)
    gpu = Index.load(tmp_path / "index", use_gpu=True)
    assert gpu.on_gpu == (faiss.get_num_gpus() > 0)
    queries = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    cpu_scores, cpu_ids = loaded.search(queries, k=5)
    gpu_scores, gpu_ids = gpu.search(queries, k=5)
    np.testing.assert_array_equal(gpu_ids, cpu_ids)
    np.testing.assert_allclose(gpu_scores, cpu_scores, atol=1e-4)


# -- extracted embeddings (export.extract) -> index.build --embeddings -> index.add ----------------


def test_build_and_add_from_extracted_embeddings(onnx_dir: Path, shards: Path, loaded: Index, tmp_path: Path) -> None:
    extract = pytest.importorskip("export.extract")
    from index.add import main as add_main

    common = ["--encoder", str(onnx_dir), "--workers", "0", "--dtype", "float32", "--no-progress"]
    assert extract.main(common + ["--data", str(shards / "part-*.tar*"), "--output", str(tmp_path / "emb")]) == 0
    assert main(["--embeddings", str(tmp_path / "emb"), "--output", str(tmp_path / "ix"), "--no-progress"]) == 0
    index = Index.load(tmp_path / "ix")
    assert index.count == loaded.count and index.info["factory"] == "Flat"
    assert index.info["encoder_fingerprint"] == loaded.info["encoder_fingerprint"]
    queries = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
    np.testing.assert_array_equal(index.search(queries, 5)[1], loaded.search(queries, 5)[1])
    assert index.records([FIRST + 2]) == loaded.records([FIRST + 2])

    make_shard(tmp_path / "more" / "more-000000.tar", count=20, start=1000, seed=5)
    assert extract.main(common + ["--data", str(tmp_path / "more" / "more-000000.tar"), "--output", str(tmp_path / "emb2")]) == 0
    assert add_main(["--index", str(tmp_path / "ix"), "--embeddings", str(tmp_path / "emb2")]) == 0
    grown = Index.load(tmp_path / "ix")
    assert grown.count == loaded.count + 20
    picture = grown.image(1005)  # the new sample's image is read back from its shard
    assert grown.search(Encoder(onnx_dir).encode_images([picture]), 1)[1][0, 0] == 1005
    other = make_onnx_dir(tmp_path / "other-onnx", with_text=False, dim=16, seed=9)
    assert extract.main(["--encoder", str(other), "--workers", "0", "--no-progress", "--data",
                         str(tmp_path / "more" / "more-000000.tar"), "--output", str(tmp_path / "emb3")]) == 0
    assert add_main(["--index", str(tmp_path / "ix"), "--embeddings", str(tmp_path / "emb3")]) == 2  # another encoder


def test_index_records_encoder_variant_and_provider(onnx_dir: Path, shards: Path, tmp_path: Path, caplog) -> None:
    """index.json says which variant and provider made its vectors: from shards (auto picks int8 on a CPU),
    and from extracted embeddings (as export.extract recorded them)."""
    from export.extract import extract

    int8_dir = add_int8_variant(shutil.copytree(onnx_dir, tmp_path / "onnx"))
    spec = str(shards / "part-000000.tar")
    with caplog.at_level("INFO"):
        info = build_index(int8_dir, spec, tmp_path / "index", batch_size=16, progress=False)
    assert info["encoder_variant"] == "int8" and info["encoder_provider"] == "CPUExecutionProvider"
    assert read_info(tmp_path / "index")["encoder_variant"] == "int8"
    assert any("int8 variant on CPUExecutionProvider" in record.getMessage() for record in caplog.records)
    fp32 = build_index(int8_dir, spec, tmp_path / "index32", batch_size=16, progress=False, precision="fp32")
    assert fp32["encoder_variant"] == "fp32" and fp32["encoder_fingerprint"] != info["encoder_fingerprint"]

    extract(int8_dir, spec, tmp_path / "emb", workers=0, progress=False, rank=0, world_size=1)
    from_embeddings = build_index(None, None, tmp_path / "index-emb", embeddings=tmp_path / "emb")
    assert from_embeddings["encoder_variant"] == "int8" and from_embeddings["encoder_provider"] == "CPUExecutionProvider"
    assert from_embeddings["encoder_fingerprint"] == info["encoder_fingerprint"]
    assert from_embeddings["has_text"] is True


def test_embeddings_of_an_image_only_encoder_have_no_text(shards: Path, tmp_path: Path, tmp_path_factory) -> None:
    from export.extract import extract

    image_only = shared_onnx_dir(tmp_path_factory, with_text=False)
    extract(image_only, str(shards / "part-000000.tar"), tmp_path / "emb", workers=0, progress=False, rank=0, world_size=1)
    info = build_index(None, None, tmp_path / "index", embeddings=tmp_path / "emb")
    assert info["has_text"] is False and info["encoder_variant"] == "fp32"
