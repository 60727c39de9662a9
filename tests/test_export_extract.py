"""export.extract and export.embeddings: shards -> embedding parts, resume, two processes, clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.embeddings import (
    EmbeddingsError, EmbeddingsMismatchError, embeddings_info, metadata_table, open_output, part_names,
    read_all, read_embeddings, write_part,
)
from export.extract import distributed_env, extract
from export.runtime import CPU, Encoder
from onnx_fixtures import CLASSES, add_int8_variant, make_onnx_dir, make_shard, shared_onnx_dir
from trainer.data.shards import decode_image, iter_samples

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    return shared_onnx_dir(tmp_path_factory, with_text=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Three shards of 30, 25 and 20 samples; sample 3 of the first and 0 of the third are corrupt."""
    base = tmp_path_factory.mktemp("shards")
    make_shard(base / "part-000000.tar", count=30, start=0, corrupt_keys=(3,), seed=0)
    make_shard(base / "part-000001.tar.gz", count=25, start=30, seed=1)
    make_shard(base / "part-000002.tar", count=20, start=55, corrupt_keys=(0,), seed=2)
    return str(base / "part-*")


def _expected(encoder_dir: Path, spec: str) -> tuple[np.ndarray, list[int]]:
    """Reference: the runtime Encoder on every decodable image, in shard order."""
    encoder = Encoder(encoder_dir, providers=[CPU])
    images, ids = [], []
    for sample in iter_samples(spec):
        try:
            images.append(decode_image(sample.image))
        except ValueError:
            continue
        ids.append(sample.sample_id)
    return encoder.encode_images(images), ids


def test_extract_matches_encoder_with_metadata_and_skips(encoder_dir: Path, shards: str, tmp_path: Path) -> None:
    summary = extract(encoder_dir, shards, tmp_path / "emb", batch_size=8, chunk_size=12, workers=1,
                      progress=False, dtype="float32", rank=0, world_size=1)
    assert summary["written"] == 73 and summary["skipped"] == 2 and summary["complete"]
    vectors, table = read_all(tmp_path / "emb")
    expected, ids = _expected(encoder_dir, shards)
    assert table.column("id").to_pylist() == ids  # global order: shard order, then sample order
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    row = table.slice(5, 1).to_pylist()[0]  # sample 6 of the first shard (sample 3 was skipped)
    assert row["key"] == "sample_000006" and row["label"] == 6 % 4 and row["label_name"] == CLASSES[6 % 4]
    assert row["caption"] == f"a photo of {CLASSES[2]} number 6" and row["shard"].endswith("part-000000.tar")
    info = embeddings_info(tmp_path / "emb")
    assert info["count"] == 73 and info["dim"] == 16 and info["dtype"] == "float32" and info["skipped"] == 2
    assert info["encoder"]["preprocess"]["image_size"] == 32 and len(info["encoder"]["fingerprint"]) == 64
    done = json.loads((tmp_path / "emb" / "done" / "000000.json").read_text())
    assert done["skipped"] == 1 and done["skipped_keys"] == ["sample_000003"] and done["written"] == 29


def test_float16_storage_and_in_process_decoding(encoder_dir: Path, shards: str, tmp_path: Path) -> None:
    extract(encoder_dir, shards, tmp_path / "emb", batch_size=64, workers=0, progress=False, rank=0, world_size=1)
    assert np.load(tmp_path / "emb" / "parts" / "000000-000000.npy").dtype == np.float16
    vectors, _ = read_all(tmp_path / "emb")
    expected, _ = _expected(encoder_dir, shards)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)  # re-normalised on reading
    np.testing.assert_allclose(vectors, expected, atol=2e-3)


def test_resume_rewrites_only_what_is_missing(encoder_dir: Path, shards: str, tmp_path: Path) -> None:
    output = tmp_path / "emb"
    extract(encoder_dir, shards, output, batch_size=8, chunk_size=12, workers=0, progress=False, dtype="float32",
            rank=0, world_size=1)
    before, table_before = read_all(output)
    # As if interrupted inside shard 1: its last chunk and its done record are missing.
    (output / "parts" / "000001-000002.parquet").unlink()
    (output / "done" / "000001.json").unlink()
    manifest = json.loads((output / "embeddings.json").read_text())
    (output / "embeddings.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(EmbeddingsError, match="incomplete"):
        next(read_embeddings(output))
    kept = {name: (output / "parts" / f"{name}.npy").stat().st_mtime_ns for name in part_names(output)}
    summary = extract(encoder_dir, shards, output, batch_size=8, chunk_size=12, workers=0, progress=False,
                      dtype="float32", rank=0, world_size=1)
    assert summary["shards"] == 1 and summary["written"] == 1 and summary["complete"]  # 25 = 12 + 12 + 1
    assert all((output / "parts" / f"{name}.npy").stat().st_mtime_ns == t for name, t in kept.items())
    after, table_after = read_all(output)
    np.testing.assert_array_equal(after, before)
    assert table_after.to_pylist() == table_before.to_pylist()


def test_other_model_in_output_is_refused(encoder_dir: Path, shards: str, tmp_path: Path) -> None:
    extract(encoder_dir, shards, tmp_path / "emb", workers=0, progress=False, rank=0, world_size=1)
    other = make_onnx_dir(tmp_path / "other", with_text=False, seed=1)
    with pytest.raises(EmbeddingsMismatchError, match="another model"):
        extract(other, shards, tmp_path / "emb", workers=0, progress=False, rank=0, world_size=1)
    with pytest.raises(EmbeddingsMismatchError, match="dtype"):
        extract(encoder_dir, shards, tmp_path / "emb", dtype="float32", workers=0, progress=False, rank=0, world_size=1)
    result = subprocess.run([sys.executable, "-m", "export.extract", "--encoder", str(other), "--data", shards,
                             "--output", str(tmp_path / "emb"), "--no-progress", "--workers", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "another model" in result.stderr and "Traceback" not in result.stderr


def test_two_processes_merge_into_one_ordered_set(encoder_dir: Path, shards: str, tmp_path: Path) -> None:
    """Two processes launched as accelerate/torchrun would (RANK, WORLD_SIZE, LOCAL_RANK) split the
    shards; the result reads back exactly as one process's."""
    single = tmp_path / "single"
    extract(encoder_dir, shards, single, batch_size=16, workers=0, progress=False, dtype="float32",
            rank=0, world_size=1)
    double = tmp_path / "double"
    processes = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "export.extract", "--encoder", str(encoder_dir), "--data", shards,
             "--output", str(double), "--batch-size", "16", "--dtype", "float32", "--workers", "1",
             "--no-progress", "--threads", "1"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    summaries = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        summaries.append(json.loads(out[out.index("{"):]))
    assert sorted(s["shards"] for s in summaries) == [1, 2]  # shards 0, 2 -> rank 0; shard 1 -> rank 1
    assert sum(s["written"] for s in summaries) == 73
    assert embeddings_info(double)["complete"]
    single_vectors, single_table = read_all(single)
    double_vectors, double_table = read_all(double)
    np.testing.assert_allclose(double_vectors, single_vectors, atol=1e-6)
    assert double_table.to_pylist() == single_table.to_pylist()


def test_distributed_env(monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed_env() == (0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed_env() == (3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK=4"):
        distributed_env()


def test_embeddings_format_atomic_parts_and_checks(tmp_path: Path) -> None:
    output = tmp_path / "emb"
    with pytest.raises(EmbeddingsError, match="not an embeddings directory"):
        embeddings_info(output)
    open_output(output, {"fingerprint": "f" * 64, "directory": "/x", "preprocess": {}}, dim=3, dtype="float16")
    table = metadata_table([7, 8], ["a", "b"], ["/s", "/s"], [1, -1], ["cat", ""], ["", ""])
    write_part(output, "b-part", np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]]), table)
    write_part(output, "a-part", np.array([[1.0, 0.0, 0.0]]), table.slice(0, 1))
    (output / "parts" / "c-part.npy").write_bytes(b"interrupted write: no parquet, so not a part")
    with pytest.raises(ValueError, match="dim 3"):
        write_part(output, "d", np.zeros((1, 4)), table.slice(0, 1))
    with pytest.raises(ValueError, match="rows"):
        write_part(output, "d", np.zeros((3, 3)), table)
    with pytest.raises(ValueError, match="part name"):
        write_part(output, "../escape", np.zeros((1, 3)), table.slice(0, 1))
    assert part_names(output) == ["a-part", "b-part"]
    info = embeddings_info(output)
    assert info["count"] == 3 and not info["complete"]  # no shard plan, not finalised
    vectors, metadata = read_all(output, allow_incomplete=True)
    assert metadata.column("id").to_pylist() == [7, 7, 8]
    np.testing.assert_allclose(vectors, [[1, 0, 0], [0.6, 0.8, 0], [0, 0, 1]], atol=1e-3)
    assert not [p for p in (output / "parts").iterdir() if ".tmp-" in p.name]


def test_extraction_side_does_not_import_torch() -> None:
    script = ("import sys, export.extract, export.embeddings, export.runtime\n"
              "print(sorted(m for m in ('torch', 'torchvision', 'open_clip', 'timm') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_broken_shard_is_named(encoder_dir: Path, tmp_path: Path) -> None:
    good = make_shard(tmp_path / "shards" / "s-000000.tar.gz", count=10)
    broken = tmp_path / "shards" / "s-000001.tar.gz"
    broken.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # truncated download
    with pytest.raises(ValueError, match=r"s-000001\.tar\.gz.*unreadable"):
        extract(encoder_dir, str(tmp_path / "shards" / "s-*"), tmp_path / "emb", workers=0, progress=False,
                rank=0, world_size=1)
    assert json.loads((tmp_path / "emb" / "done" / "000000.json").read_text())["written"] == 10  # kept for resuming


def test_variant_and_provider_are_recorded_and_never_mix(encoder_dir: Path, tmp_path: Path) -> None:
    """auto extracts with int8 on a CPU when exported, says so (summary, embeddings.json, CLI output), and
    an output started with one variant refuses another: their embeddings are close, not identical."""
    import hashlib
    import shutil

    from export.embeddings import encoder_identity, file_sha256

    int8_dir = add_int8_variant(shutil.copytree(encoder_dir, tmp_path / "onnx"))
    shard = str(make_shard(tmp_path / "data" / "part-000000.tar", count=12, seed=4))
    summary = extract(int8_dir, shard, tmp_path / "emb", batch_size=8, workers=0, progress=False, rank=0, world_size=1)
    assert summary["precision"] == "int8" and summary["provider"] == CPU
    assert summary["encoder"] == f"int8 variant on {CPU}"
    identity = embeddings_info(tmp_path / "emb")["encoder"]
    assert identity["variant"] == "int8" and identity["provider"] == CPU
    assert identity["image_model"] == "image_encoder.int8.onnx"
    with pytest.raises(EmbeddingsMismatchError, match=r"int8 variant.*fp32 variant.*--precision int8"):
        extract(int8_dir, shard, tmp_path / "emb", precision="fp32", workers=0, progress=False, rank=0, world_size=1)

    # fp32's fingerprint is the one written before variants were recorded (image_encoder.onnx +
    # preprocess.json), so existing embeddings and indexes keep matching; int8's differs.
    fp32 = encoder_identity(int8_dir)
    legacy = hashlib.sha256((file_sha256(int8_dir / "image_encoder.onnx") +
                             file_sha256(int8_dir / "preprocess.json")).encode()).hexdigest()
    assert fp32["fingerprint"] == legacy and fp32["variant"] == "fp32"
    assert identity["fingerprint"] != legacy

    result = subprocess.run([sys.executable, "-m", "export.extract", "--encoder", str(int8_dir), "--data", shard,
                             "--output", str(tmp_path / "emb32"), "--precision", "fp32", "--workers", "0",
                             "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["encoder"] == f"fp32 variant on {CPU}" and printed["precision"] == "fp32"
    assert f"fp32 variant on {CPU}" in result.stderr  # the log line
    assert embeddings_info(tmp_path / "emb32")["encoder"]["variant"] == "fp32"
