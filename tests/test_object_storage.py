"""Object storage: shards, embeddings and indexes at s3:// URLs, against a local S3 server (moto, 127.0.0.1).

The module's fixture starts ``moto_server`` on a free port, points the usual AWS variables at it
(``AWS_ENDPOINT_URL``, dummy ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``; no ~/.aws is read), uploads two
tiny shards and stops the server by its process id. The tests train 3 steps from s3:// shards (the epoch length
counted from the remote tar headers), extract to s3:// and resume, build an index from those embeddings into a
local directory and to s3://, and check that a wrong URL is named in the error and that no credential is written.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnx_fixtures import make_shard, shared_onnx_dir
from server_helpers import free_port, stop_process, wait_until_listening
from trainer.data import storage
from trainer.data.shards import ShardPatternError, count_samples, expand_patterns, iter_shard, read_manifest

pytest.importorskip("s3fs", reason="s3:// needs s3fs (pip install 'manyview[storage]')")

KEY_ID = "MANYVIEWTESTKEYID0000"
SECRET = "manyview-test-secret-do-not-log-0123456789"
BUCKET = "manyview-test"
SHARDS = f"s3://{BUCKET}/shards"


def _moto_command(port: int) -> list[str]:
    script = Path(sys.executable).with_name("moto_server")
    if not script.exists():
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    return [str(script), "-H", "127.0.0.1", "-p", str(port)]


def _clear_s3_clients() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with bucket ``BUCKET`` holding ``shards/train-00000{0,1}.tar`` (24 samples
    each) and their ``manifest.json``; yields the local copy of the shards."""
    port = free_port()
    local = tmp_path_factory.mktemp("s3-shards")
    make_shard(local / "train-000000.tar", count=24, start=0, seed=5)
    make_shard(local / "train-000001.tar", count=24, start=24, seed=6)
    process = subprocess.Popen(_moto_command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with pytest.MonkeyPatch.context() as patch:
        try:
            wait_until_listening(port, process, "moto_server")
            for name, value in {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET,
                                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                                "AWS_CONFIG_FILE": str(local / "no-aws-config"),
                                "AWS_SHARED_CREDENTIALS_FILE": str(local / "no-aws-credentials")}.items():
                patch.setenv(name, value)
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
                patch.delenv(name, raising=False)
            _clear_s3_clients()
            fs, _ = storage.filesystem(f"s3://{BUCKET}")
            fs.mkdir(BUCKET)
            for name in ("train-000000.tar", "train-000001.tar", "manifest.json"):
                storage.upload(local / name, f"{SHARDS}/{name}")
            yield local
        finally:
            _clear_s3_clients()
            stop_process(process)


def _objects(prefix: str) -> list[str]:
    fs, inner = storage.filesystem(prefix)
    fs.invalidate_cache()
    return sorted(fs.unstrip_protocol(path) for path in fs.find(inner))


def _assert_no_credentials(text: str, where: str) -> None:
    assert SECRET not in text and KEY_ID not in text, f"a credential was written into {where}"


def test_urls_are_named_without_credentials() -> None:
    signed = "https://user:p%40ss@host.example/data/train-000001.tar?X-Amz-Signature=abc&X-Amz-Credential=AKIA"
    assert storage.public(signed) == "https://host.example/data/train-000001.tar"
    piped = storage.public(f"pipe:curl -s {signed} -o -")
    assert piped == "pipe:curl -s https://host.example/data/train-000001.tar -o -"
    assert storage.public("/data/a@b?.tar") == "/data/a@b?.tar"  # local paths are left alone
    assert storage.is_url("s3://b/k") and storage.is_url("pipe:cat x") and not storage.is_url("/data/x.tar")
    assert storage.absolute("s3://b/k") == "s3://b/k" and storage.absolute("x.tar") == os.path.abspath("x.tar")


def test_replace_local_writes_whole_and_leaves_nothing_behind_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "index.json"
    target.write_text("old")
    storage.replace_local(target, lambda temporary: Path(temporary).write_text("new"))
    assert target.read_text() == "new"

    def fail_halfway(temporary: str) -> None:
        Path(temporary).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        storage.replace_local(target, fail_halfway)
    assert target.read_text() == "new"  # the old content, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]  # no temporary file left


def test_pipe_shards_expand_braces_stream_and_name_a_failing_command(tmp_path: Path) -> None:
    make_shard(tmp_path / "train-000000.tar", count=6, start=0)
    make_shard(tmp_path / "train-000001.tar", count=5, start=6)
    urls = expand_patterns(f"pipe:cat {tmp_path}/train-{{000000..000001}}.tar")
    assert urls == [f"pipe:cat {tmp_path}/train-000000.tar", f"pipe:cat {tmp_path}/train-000001.tar"]
    assert [len(list(iter_shard(url))) for url in urls] == [6, 5] and count_samples(urls) == 11
    with pytest.raises(OSError, match="pipe:cat /nonexistent/train.tar"):
        list(iter_shard("pipe:cat /nonexistent/train.tar 2>/dev/null"))


def test_remote_shards_expand_read_and_count_like_local_ones(s3: Path) -> None:
    urls = [f"{SHARDS}/train-000000.tar", f"{SHARDS}/train-000001.tar"]
    assert expand_patterns(f"{SHARDS}/train-*.tar") == urls
    assert expand_patterns(f"{SHARDS}/train-{{000000..000001}}.tar") == urls
    assert expand_patterns(SHARDS) == urls  # a "directory": every shard under the prefix
    assert expand_patterns(f"{SHARDS}/train-000001.tar::{SHARDS}/train-000000.tar") == urls[::-1]
    remote = [(s.key, s.sample_id, s.label, s.caption, s.image) for s in iter_shard(urls[1])]
    local = [(s.key, s.sample_id, s.label, s.caption, s.image) for s in iter_shard(str(s3 / "train-000001.tar"))]
    assert remote == local and len(remote) == 24
    assert read_manifest(urls)["classes"] == json.loads((s3 / "manifest.json").read_text())["classes"]
    assert count_samples(urls) == 48  # no per-file counts in the manifest: read from the remote tar headers


@pytest.fixture(scope="module")
def http_shards(s3: Path):
    """The same shards served by ``python -m http.server`` on 127.0.0.1 (stopped by its process id)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(s3),
                                str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_listening(port, process, "http.server", timeout_s=20)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)


def test_http_shards_read_through_brace_ranges(s3: Path, http_shards: str) -> None:
    urls = expand_patterns(f"{http_shards}/train-{{000000..000001}}.tar")
    assert urls == [f"{http_shards}/train-000000.tar", f"{http_shards}/train-000001.tar"]
    assert [s.key for s in iter_shard(urls[0])] == [s.key for s in iter_shard(str(s3 / "train-000000.tar"))]
    assert count_samples(urls) == 48 and read_manifest(urls)["classes"]
    with pytest.raises(ShardPatternError, match="cannot be listed"):
        expand_patterns(f"{http_shards}/train-*.tar")


def test_a_wrong_s3_path_is_named_in_the_error(s3: Path, capsys) -> None:
    from export.extract import main as extract_main

    with pytest.raises(ShardPatternError, match=f"s3://{BUCKET}/nothing/here-\\*.tar"):
        expand_patterns(f"s3://{BUCKET}/nothing/here-*.tar")
    with pytest.raises(ShardPatternError, match=f"s3://{BUCKET}/shards/train-000002.tar"):
        expand_patterns(f"{SHARDS}/train-{{000000..000007}}.tar")
    with pytest.raises(ShardPatternError, match="s3://no-such-bucket-manyview/x"):
        expand_patterns("s3://no-such-bucket-manyview/x")
    with pytest.raises(FileNotFoundError, match=f"s3://{BUCKET}/shards/missing.tar"):
        next(iter_shard(f"{SHARDS}/missing.tar"))
    status = extract_main(["--encoder", str(s3), "--data", f"s3://{BUCKET}/typo/*.tar", "--output", str(s3 / "e")])
    assert status == 2 and f"s3://{BUCKET}/typo/*.tar" in capsys.readouterr().err


def test_the_eval_pipeline_reads_s3_shards_in_order(s3: Path) -> None:
    from trainer.data.pipeline import eval_batches
    from trainer.data.preprocess import Preprocess

    batches = list(eval_batches(expand_patterns(f"{SHARDS}/train-*.tar"), Preprocess(), batch_size=20, num_workers=0))
    assert [int(i) for batch in batches for i in batch["id"]] == list(range(48))
    assert batches[0]["image"].shape == (20, 3, 32, 32)


def test_three_training_steps_from_s3_shards(s3: Path, tmp_path: Path) -> None:
    from trainer.pretrain import main as pretrain

    run = tmp_path / "run"
    # --epochs 0.5 (48 samples, batch 8): the epoch length is counted from the remote shards, giving 3 steps.
    status = pretrain(["--objective", "simclr", "--train-data", f"{SHARDS}/train-*.tar", "--output", str(run),
                       "--backbone", "cnn-small", "--image-size", "32", "--batch-size", "8", "--epochs", "0.5",
                       "--log-every", "1", "--num-workers", "1", "--checkpoint-every", "0",
                       "--set", "projection_hidden_dim=64"])
    assert status == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3] and all(np.isfinite(row["loss"]) for row in rows)
    assert (run / "model" / "config.json").is_file()


def test_extract_to_s3_resumes_and_builds_an_index(s3: Path, tmp_path_factory, tmp_path: Path, monkeypatch) -> None:
    from export.embeddings import embeddings_info, read_all
    from export.extract import extract, main as extract_main
    from index.build import main as build_main
    from index.search import Index
    from index.store import fetch_index, local_copy, read_info

    encoder = shared_onnx_dir(tmp_path_factory, with_text=False)
    output = f"s3://{BUCKET}/emb"
    argv = ["--encoder", str(encoder), "--data", f"{SHARDS}/train-{{000000..000001}}.tar", "--output", output,
            "--batch-size", "8", "--chunk-size", "10", "--workers", "0", "--dtype", "float32", "--no-progress"]
    assert extract_main(argv) == 0
    info = embeddings_info(output)
    assert info["complete"] and info["count"] == 48 and info["path"] == output and info["parts"] == 6
    assert info["shards"] == [f"{SHARDS}/train-000000.tar", f"{SHARDS}/train-000001.tar"]
    remote_vectors, remote_table = read_all(output)
    extract(encoder, str(s3 / "train-*.tar"), tmp_path / "emb", batch_size=8, chunk_size=10, workers=0,
            dtype="float32", progress=False, rank=0, world_size=1)
    local_vectors, local_table = read_all(tmp_path / "emb")
    np.testing.assert_allclose(remote_vectors, local_vectors, atol=1e-6)
    assert remote_table.column("id").to_pylist() == local_table.column("id").to_pylist() == list(range(48))
    assert remote_table.column("shard").to_pylist()[0] == f"{SHARDS}/train-000000.tar"

    # Resume: lose the second shard's done record and its last part; the re-run writes only that part.
    storage.remove(f"{output}/done/000001.json")
    storage.remove(f"{output}/parts/000001-000002.parquet")
    summary = extract(encoder, f"{SHARDS}/train-*.tar", output, batch_size=8, chunk_size=10, workers=0,
                      dtype="float32", progress=False, rank=0, world_size=1)
    assert summary["written"] == 4 and summary["complete"] and summary["output"] == output
    np.testing.assert_allclose(read_all(output)[0], local_vectors, atol=1e-6)

    local_index = tmp_path / "index"
    assert build_main(["--embeddings", output, "--output", str(local_index), "--no-progress", "--cpu"]) == 0
    assert Index.load(local_index).count == 48 and read_info(local_index)["embeddings"] == output

    remote_index = f"s3://{BUCKET}/index"
    for _ in range(2):  # the second build replaces the first generation, whose objects are then deleted
        assert build_main(["--embeddings", output, "--output", remote_index, "--no-progress", "--cpu"]) == 0
    remote_info = read_info(remote_index)
    names = sorted(name.rsplit("/", 1)[1] for name in _objects(remote_index))
    assert names == sorted(["index.json", *remote_info["files"].values()])
    cached = local_copy(remote_index, tmp_path / "cache")
    assert local_copy(str(local_index)) == str(local_index) and fetch_index(remote_index, cached) == Path(cached)
    index = Index.load(cached)
    vectors, table = read_all(output)
    _, ids = index.search(vectors[:5], k=1)
    assert ids[:, 0].tolist() == table.column("id").to_pylist()[:5]
    # The metadata names the shards by their s3:// URLs: the app's images and thumbnails are read from there.
    from app.thumbnails import ThumbnailStore

    record = index.records([int(ids[0, 0])])[0]
    assert record["shard"].startswith("s3://") and index.image(int(ids[0, 0])).size[0] > 0
    assert ThumbnailStore().images([record])[0].size == index.image(int(ids[0, 0])).size

    written = [storage.read_bytes(url).decode("utf-8") for url in _objects(f"s3://{BUCKET}") if url.endswith(".json")]
    written.append((local_index / "index.json").read_text())
    assert len(written) >= 4  # embeddings.json, two done records, index.json (remote and local)
    for text in written:
        _assert_no_credentials(text, "a JSON file")

    # `python -m app --index s3://...` serves a local copy in the user's cache.
    from app.__main__ import AppError, local_index as app_index

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    served = app_index(remote_index)
    assert served.startswith(str(tmp_path / "xdg")) and Index.load(served).count == 48
    with pytest.raises(AppError, match=f"cannot download index s3://{BUCKET}/missing"):
        app_index(f"s3://{BUCKET}/missing")

