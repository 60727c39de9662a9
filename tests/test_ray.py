"""--engine ray: extraction and index building on a two-node Ray cluster started here, with killed workers.

One cluster per module (a head and a second node on 127.0.0.1, one CPU each, in a temporary directory),
stopped in ``finally`` by killing the processes it started, by pid (``ray stop --force`` would stop every
Ray process on the machine, other users' included).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from export.embeddings import part_names, read_all
from export.extract import extract, main as extract_main
from onnx_fixtures import make_shard, shared_onnx_dir
from server_helpers import free_port, process_tree
from test_object_storage import BUCKET, _objects, s3  # noqa: F401  (s3: the moto S3 server fixture)

BATCH, CHUNK = 8, 30


class _Cluster:
    """A head plus one worker node (one CPU each) on 127.0.0.1, started in a background thread while the
    module's other fixtures build (``ray start`` takes 10-20 s per node, mostly waiting)."""

    def __init__(self) -> None:
        self.temp = tempfile.mkdtemp(prefix="mvray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        self.address = f"127.0.0.1:{free_port()}"
        self.pids: set[int] = set()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._start, daemon=True)

    def _start(self) -> None:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        ray_cli = str(Path(sys.executable).with_name("ray"))
        common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
        port = self.address.rsplit(":", 1)[1]
        starts = []
        try:  # both at once: the second node waits for the head's GCS, which halves the start-up
            for extra in (["--head", "--port", port, "--include-dashboard=false", "--temp-dir", self.temp],
                          ["--address", self.address]):
                starts.append(subprocess.Popen([ray_cli, "start", *extra, *common], env=env,
                                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
                time.sleep(0.5)
            for start in starts:
                output, _ = start.communicate(timeout=120)
                if start.returncode:
                    raise RuntimeError(f"`ray start` exited with {start.returncode}: {output.decode()[-1500:]}")
        except BaseException as error:  # reported by wait(), in the test that needs the cluster
            self.error = error
            for start in starts:
                start.kill()
        finally:
            self.pids |= process_tree((self.temp, self.address))

    def wait(self) -> str:
        self.thread.join()
        if self.error is not None:
            raise RuntimeError(f"could not start the Ray cluster: {self.error}")
        return self.address

    def stop(self) -> None:
        self.thread.join()
        for pid in self.pids | process_tree((self.temp, self.address)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _cluster():
    """Starts the cluster first thing in this module (in the background), stops it by pid at the end."""
    if importlib.util.find_spec("ray") is None:
        yield None
        return
    cluster = _Cluster()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_AUTH_MODE", "disabled")  # the test's driver joins a cluster without token auth
        patch.delenv("RAY_ADDRESS", raising=False)
        cluster.thread.start()
        try:
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture(scope="module")
def ray_cluster(_cluster) -> str:
    """``HOST:PORT`` of the two-node cluster, once it is up."""
    if _cluster is None:
        pytest.skip("ray is not installed (pip install '.[ray]')")
    return _cluster.wait()


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    return shared_onnx_dir(tmp_path_factory, with_text=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Three shards of 100 small images; one undecodable sample in the second."""
    base = tmp_path_factory.mktemp("ray-shards")
    for i in range(3):
        make_shard(base / f"part-{i:06d}.tar", count=100, start=100 * i, seed=i, corrupt_keys=(7,) if i == 1 else ())
    return str(base / "part-*.tar")


@pytest.fixture(scope="module")
def local_output(encoder_dir: Path, shards: str, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "emb"
    summary = extract(encoder_dir, shards, out, batch_size=BATCH, chunk_size=CHUNK, dtype="float32", workers=1,
                      progress=False, rank=0, world_size=1)
    assert summary["complete"] and summary["written"] == 299
    return out


def _assert_same_output(expected: Path, actual: Path) -> None:
    assert part_names(actual) == part_names(expected)
    vectors, table = read_all(actual)
    reference, reference_table = read_all(expected)
    assert table.column("id").to_pylist() == reference_table.column("id").to_pylist()
    assert table.equals(reference_table)  # keys, shards, labels, captions, in the same order
    np.testing.assert_allclose(vectors, reference, atol=1e-6, rtol=0)
    for name in sorted(os.listdir(expected / "done")):
        done, reference_done = (json.loads((path / "done" / name).read_text()) for path in (actual, expected))
        assert (done["written"], done["skipped"], done["parts"]) == (
            reference_done["written"], reference_done["skipped"], reference_done["parts"])


def test_ray_extract_survives_killed_workers_and_equals_local(encoder_dir: Path, shards: str, local_output: Path,
                                                                ray_cluster: str, tmp_path: Path) -> None:
    from export.ray_extract import extract_ray

    killed: dict[str, int] = {}
    actor_pids: list[int] = []

    def kill_workers(event: dict) -> None:
        actor_pids.append(event["actor_pid"])
        if event["units"] == 3:  # a reader in the middle of shard 0 (100 samples: 14 units)
            killed["reader"] = event["reader_pid"]
            os.kill(event["reader_pid"], signal.SIGKILL)
        if event["units"] == 20:  # the encoder actor, with calls in flight
            killed["actor"] = event["actor_pid"]
            os.kill(event["actor_pid"], signal.SIGKILL)

    summary = extract_ray(encoder_dir, shards, tmp_path / "emb", batch_size=BATCH, chunk_size=CHUNK, dtype="float32",
                          progress=False, address=ray_cluster, actors=1, on_unit=kill_workers)
    assert set(killed) == {"reader", "actor"}
    assert summary["complete"] and summary["retried_shards"] >= 1 and summary["written"] == 299
    assert actor_pids[-1] != killed["actor"]  # Ray restarted the actor and retried its calls
    _assert_same_output(local_output, tmp_path / "emb")


def test_ray_resumes_a_local_engine_output(ray_cluster: str, encoder_dir: Path, shards: str,
                                                               local_output: Path, tmp_path: Path) -> None:
    from export.ray_extract import extract_ray

    partial = tmp_path / "emb"
    shutil.copytree(local_output, partial)
    (partial / "done" / "000002.json").unlink()  # shard 2 unfinished: its last chunk missing
    last = part_names(partial)[-1]
    assert last.startswith("000002-")
    for suffix in (".npy", ".parquet"):
        (partial / "parts" / f"{last}{suffix}").unlink()
    summary = extract_ray(encoder_dir, shards, partial, batch_size=BATCH, chunk_size=CHUNK, dtype="float32",
                          progress=False, address=ray_cluster)
    assert summary["shards"] == 1 and summary["written"] == 10 and summary["complete"]  # only the missing chunk
    _assert_same_output(local_output, partial)


def test_ray_reports_a_broken_shard_after_finishing_the_others(ray_cluster: str, encoder_dir: Path, shards: str,
                                                              tmp_path: Path) -> None:
    from export.ray_extract import extract_ray

    good = make_shard(tmp_path / "good" / "broken-000000.tar.gz", count=40, seed=3)
    broken = tmp_path / "broken-000000.tar.gz"
    broken.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # a truncated download
    with pytest.raises(ValueError, match=r"broken-000000\.tar\.gz.* unreadable after"):
        extract_ray(encoder_dir, f"{broken}::{Path(shards).parent / 'part-000000.tar'}", tmp_path / "emb",
                    batch_size=BATCH, chunk_size=CHUNK, progress=False, address=ray_cluster)
    assert sorted(os.listdir(tmp_path / "emb" / "done")) == ["000001.json"]  # the good shard finished, not retried


def test_ray_engine_without_ray_says_how_to_install(monkeypatch, capsys, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    status = extract_main(["--engine", "ray", "--encoder", str(tmp_path), "--data", str(tmp_path / "x.tar"),
                           "--output", str(tmp_path / "emb"), "--no-progress"])
    error = capsys.readouterr().err
    assert status == 2 and "pip install 'manyview[ray]'" in error and "pip install '.[ray]'" in error


# -- index.build --engine ray -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def clustered_embeddings(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """3,000 unit vectors around 30 centres, in 6 parts of an embeddings directory; also returns them and ids."""
    from export.embeddings import finalize, metadata_table, open_output, write_part

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((30, 32))
    vectors = (centres[rng.integers(0, 30, 3000)] + 0.6 * rng.standard_normal((3000, 32))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = rng.permutation(10**6)[:3000].astype(np.int64) + 10**9
    out = tmp_path_factory.mktemp("ray-index") / "emb"
    open_output(out, {"fingerprint": "f" * 64, "directory": "synthetic"}, 32, "float32")
    for part in range(6):
        rows = slice(part * 500, (part + 1) * 500)
        n = 500
        table = metadata_table(ids[rows], [f"k{i}" for i in ids[rows]], ["s"] * n, [-1] * n, [""] * n, [""] * n)
        write_part(out, f"p{part}", vectors[rows], table)
    finalize(out)
    return out, vectors, ids


def _recall(index, queries: np.ndarray, truth: np.ndarray, params: dict, k: int = 10) -> float:
    found = index.search(queries, k, params=params)[1]
    return float(np.mean([len(set(row) & set(expected)) / k for row, expected in zip(found, truth)]))


def test_ray_index_build_equals_local_build(ray_cluster: str, clustered_embeddings, tmp_path: Path) -> None:
    from index.build import build_index
    from index.ray_build import build_ray
    from index.search import Index

    emb, vectors, ids = clustered_embeddings
    info = build_ray(emb, tmp_path / "ray", num_parts=3, on_disk=True, address=ray_cluster, tune_queries=200,
                     use_gpu=False)
    assert info["factory"] == "IVF64,Flat" and info["ray_parts"] == 3 and info["count"] == 3000  # not Flat: mergeable
    build_index(None, None, tmp_path / "local", embeddings=emb, factory=info["factory"], use_gpu=False)
    merged, local = Index.load(tmp_path / "ray"), Index.load(tmp_path / "local")
    assert "lists" in merged.info["files"]  # merged on disk
    assert sorted(merged.ids.tolist()) == sorted(local.ids.tolist()) == sorted(ids.tolist())
    rng = np.random.default_rng(5)
    queries = vectors[rng.choice(3000, 200, replace=False)] + 0.3 * rng.standard_normal((200, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = ids[np.argsort(-(queries @ vectors.T), axis=1)[:, :10]]
    for params in (local.search_params, {"nprobe": 2}):
        assert abs(_recall(merged, queries, truth, params) - _recall(local, queries, truth, params)) <= 0.005


def test_ray_index_build_refuses_what_cannot_merge(clustered_embeddings, tmp_path: Path, capfd) -> None:
    from index.build import main as build_main
    from index.merge import train
    from index.ray_build import build_ray

    emb, _, _ = clustered_embeddings
    with pytest.raises(ValueError, match=r"stays in RAM: merge it without --on-disk"):  # before any Ray work
        build_ray(emb, tmp_path / "ix", factory="IVF32,PQ8x4fs,RFlat", on_disk=True)
    with pytest.raises(ValueError, match="only IVF indexes"):
        train(emb, tmp_path / "parts", factory="HNSW16")
    assert build_main(["--engine", "ray", "--encoder", "x", "--data", "y", "--output", str(tmp_path / "ix")]) == 2
    assert "python -m export.extract --engine ray" in capfd.readouterr().err


def test_ray_build_uploads_its_index_to_s3(ray_cluster: str, s3: Path, tmp_path: Path) -> None:  # noqa: F811
    """``index.build --engine ray --output s3://...``: merged (lists on disk) in a local staging directory, then
    uploaded with index.json last; the served copy holds every id. (Here, not in test_object_storage.py: every Ray
    test uses this module's cluster; a second Ray started by another xdist worker would join it.)"""
    from export.embeddings import finalize, metadata_table, open_output, write_part
    from index.ray_build import build_ray
    from index.search import Index
    from index.store import local_copy, read_info

    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((600, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(600, dtype=np.int64) + 7_000
    emb = tmp_path / "emb"
    open_output(emb, {"fingerprint": "e" * 64, "directory": "synthetic"}, 16, "float32")
    for part in range(3):
        rows = slice(part * 200, (part + 1) * 200)
        table = metadata_table(ids[rows], [f"k{i}" for i in ids[rows]], ["s"] * 200, [-1] * 200, [""] * 200,
                               [""] * 200)
        write_part(emb, f"p{part}", vectors[rows], table)
    finalize(emb)
    url = f"s3://{BUCKET}/ray-index"
    info = build_ray(emb, url, factory="IVF8,Flat", num_parts=2, on_disk=True, address=ray_cluster, tune_queries=50,
                     use_gpu=False)
    assert info["count"] == 600 and "lists" in info["files"] and read_info(url)["files"] == info["files"]
    names = sorted(name.rsplit("/", 1)[1] for name in _objects(url))
    assert names == sorted(["index.json", *info["files"].values()])
    served = Index.load(local_copy(url, tmp_path / "cache"))
    assert sorted(served.ids.tolist()) == ids.tolist()
    assert served.search(vectors[:3], k=1)[1][:, 0].tolist() == ids[:3].tolist()
    # built again as a set of two indexes (when one would not fit): every member uploaded, then the set's
    # index.json; the single index's objects are gone, and the served set finds what the single index found
    info = build_ray(emb, url, factory="IVF8,Flat", num_parts=2, num_indexes=2, address=ray_cluster, tune_queries=50,
                     use_gpu=False)
    assert len(info["members"]) == 2 and info["count"] == 600
    names = sorted(name.split(f"{BUCKET}/ray-index/", 1)[1] for name in _objects(url))
    members = [read_info(f"{url}/{member}") for member in info["members"]]
    assert names == sorted(["index.json"] + [f"{member}/{name}" for member, member_info in zip(info["members"], members)
                                             for name in ["index.json", *member_info["files"].values()]])
    served_set = Index.load(local_copy(url, tmp_path / "cache"))
    assert sorted(served_set.ids.tolist()) == ids.tolist() and sum(m["count"] for m in members) == 600
    queries = vectors[:20]
    np.testing.assert_array_equal(served_set.search(queries, 5, params={"nprobe": 8})[1],
                                  served.search(queries, 5, params={"nprobe": 8})[1])  # every list: exact
