"""Curation (``index.curate``, ``app.curate_tab``): known-value scores, and a planted CIFAR case end to end.

The planted case: 200 CIFAR-10 test images in a ``test`` shard; a ``train`` shard with 100 CIFAR-10
train images, 40 near copies of test images (re-encoded as JPEG at another quality, cropped by a pixel
or two, colour-shifted, or all three), 5 byte-identical copies of test images and 2 byte-identical
copies of a train image. The encoder is a fixed 8x8 "thumbnail" network (average pooling, each
channel's mean removed, exported to ONNX): the random-init fixture encoder does not separate planted
copies from distinct images (copies down to cosine 0.84, distinct images up to 0.98, measured), and a
trained one takes minutes; the thumbnail is what a perceptual hash does. The trained-encoder figures on
all of CIFAR-10 are in ``tests/benchmarks/bench_curate.py``.

The helpers here (``thumbnail_encoder_dir``, ``perturb``, ``write_planted``) are shared with that benchmark.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from onnx_fixtures import CIFAR_DIR, CIFAR_SKIP_REASON

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("jpeg", "crop", "colour", "all")


# -- helpers shared with the benchmark ---------------------------------------------------------------


def thumbnail_encoder_dir(path: str | os.PathLike, grid: int = 8, image_size: int = 32) -> Path:
    """An exported-encoder directory whose embedding is the image averaged down to ``grid`` x ``grid`` with
    each channel's mean removed (invariant to a uniform colour shift; cosine = correlation of thumbnails).
    The ONNX graph (AveragePool, ReduceMean, Sub, Flatten) is written with ``onnx.helper``: no torch."""
    import onnx
    from onnx import TensorProto, helper

    if image_size % grid:
        raise ValueError(f"image_size {image_size} must be a multiple of grid {grid}")
    cell = image_size // grid
    nodes = [
        helper.make_node("AveragePool", ["pixels"], ["small"], kernel_shape=[cell, cell], strides=[cell, cell]),
        helper.make_node("ReduceMean", ["small", "axes"], ["mean"], keepdims=1),
        helper.make_node("Sub", ["small", "mean"], ["centred"]),
        helper.make_node("Flatten", ["centred"], ["embedding"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "thumbnail",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, image_size, image_size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 3 * grid * grid])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / "image_encoder.onnx"))
    info = {"image_size": image_size, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3, "resize": "bicubic",
            "crop": "center", "embed_dim": 3 * grid * grid, "image_input": "pixels", "text_input": "tokens",
            "output": "embedding", "tokenizer": None,
            "model": {"objective": "fixture", "backbone": f"thumbnail-{grid}x{grid}", "steps": 0}}
    (out / "preprocess.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return out


def perturb(data: bytes, kind: str, rng: np.random.Generator, max_crop: int = 1) -> bytes:
    """A near copy of an encoded image as JPEG bytes: ``jpeg`` (re-encoded at quality 60-90), ``crop`` (up to
    ``max_crop`` pixels off each side, at least one off one side, scaled back), ``colour`` (each channel
    shifted by up to +-16 levels and the contrast by up to 10%), ``all`` (the three together)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    if kind in ("crop", "all"):
        left, top, right, bottom = rng.integers(0, max_crop + 1, size=4)
        if left + top + right + bottom == 0:
            left = 1
        image = image.crop((left, top, width - right, height - bottom)).resize((width, height), Image.BICUBIC)
    if kind in ("colour", "all"):
        pixels = np.asarray(image, dtype=np.float32)
        contrast = rng.uniform(0.9, 1.1)
        pixels = (pixels - pixels.mean()) * contrast + pixels.mean() + rng.uniform(-16, 16, size=3)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    quality = int(rng.integers(60, 91))
    while True:  # "another quality": never the source's own bytes back
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        if buffer.getvalue() != data:
            return buffer.getvalue()
        quality = quality + 1 if quality < 95 else 50


def read_samples(shard: str | os.PathLike, count: int, skip: int = 0) -> list[dict]:
    """The raw members (extension -> bytes) and key of ``count`` samples of a shard, after ``skip``."""
    samples: list[dict] = []
    with tarfile.open(shard, "r:*") as tar:
        current: dict | None = None
        seen = 0
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = os.path.basename(info.name).partition(".")
            if current is None or current["key"] != key:
                if current is not None:
                    seen += 1
                    if seen > skip:
                        samples.append(current)
                    if len(samples) == count:
                        return samples
                current = {"key": key, "members": {}}
            handle = tar.extractfile(info)
            current["members"][ext] = handle.read() if handle is not None else b""
        if current is not None and seen + 1 > skip and len(samples) < count:
            samples.append(current)
    return samples


def write_shard(path: str | os.PathLike, samples: list[dict]) -> Path:
    """A plain ``.tar`` WebDataset shard of ``samples`` ({key, members})."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w") as tar:
        for sample in samples:
            for ext, data in sample["members"].items():
                info = tarfile.TarInfo(f"{sample['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out


@dataclass
class Planted:
    """What was planted: near copies (copy key -> source key, kind), exact copies (copy key -> source key)."""

    near: dict[str, tuple[str, str]] = field(default_factory=dict)
    exact: dict[str, str] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)

    def pairs(self) -> set[frozenset]:
        """Every pair of keys that should share a group: each copy with its source, copies of one source together."""
        groups: dict[str, set[str]] = {}
        for copy, (source, _) in self.near.items():
            groups.setdefault(source, {source}).add(copy)
        for copy, source in self.exact.items():
            groups.setdefault(source, {source}).add(copy)
        return {frozenset((a, b)) for keys in groups.values() for a in keys for b in keys if a < b}


def plant(sources: list[dict], near_per_kind: int, exact: int, seed: int = 0, prefix: str = "planted",
          train_sources: list[dict] | None = None, train_exact: int = 0, max_crop: int = 1) -> Planted:
    """Near copies of the first ``4 * near_per_kind`` ``sources`` (one kind each, in turn), byte-identical
    copies of the next ``exact`` ones, and ``train_exact`` byte-identical copies of ``train_sources[0]``;
    every copy keeps its source's label and caption, under a new key (hence a new id)."""
    rng = np.random.default_rng(seed)
    planted = Planted()
    for number in range(near_per_kind * len(KINDS)):
        source, kind = sources[number], KINDS[number % len(KINDS)]
        key = f"{prefix}_{kind}_{number:05d}"
        members = {ext: data for ext, data in source["members"].items() if ext not in ("jpg", "jpeg", "png", "id")}
        members["jpg"] = perturb(source["members"].get("jpg") or source["members"]["png"], kind, rng, max_crop)
        planted.samples.append({"key": key, "members": members})
        planted.near[key] = (source["key"], kind)
    offset = near_per_kind * len(KINDS)
    extra = [(sources[offset + number], f"{prefix}_exact_{number:05d}") for number in range(exact)]
    extra += [((train_sources or [])[0], f"{prefix}_exact_train_{number:05d}") for number in range(train_exact)]
    for source, key in extra:
        members = {ext: data for ext, data in source["members"].items() if ext != "id"}
        planted.samples.append({"key": key, "members": members})
        planted.exact[key] = source["key"]
    return planted


def pair_metrics(found: set[frozenset], truth: set[frozenset]) -> dict:
    """Recall and precision of found pairs against planted ones."""
    hits = len(found & truth)
    return {"found": len(found), "planted": len(truth), "true": hits,
            "recall": hits / len(truth) if truth else 1.0, "precision": hits / len(found) if found else 1.0}


def group_pairs(table, key_column: str = "key") -> set[frozenset]:
    """Every pair of members of the same group of a members table (group, key)."""
    by_group: dict[int, list[str]] = {}
    for group, key in zip(table.column("group").to_pylist(), table.column(key_column).to_pylist()):
        by_group.setdefault(int(group), []).append(str(key))
    return {frozenset((a, b)) for keys in by_group.values() for i, a in enumerate(keys) for b in keys[i + 1:]}


# -- known values -----------------------------------------------------------------------------------


def test_uniqueness_is_the_weighted_distance_to_the_three_nearest_divided_by_the_largest():
    from index.curate import uniqueness

    scores = np.array([[0.9, 0.8, 0.7, 0.1],     # 0.6*0.1 + 0.3*0.2 + 0.1*0.3 = 0.15
                       [0.5, 0.5, 0.5, 0.5],     # 0.5 (the largest)
                       [1.0, 1.0, 1.0, 0.0],     # 0: identical copies
                       [0.8, -np.inf, -np.inf, -np.inf]], dtype=np.float32)  # one neighbour: its distance, 0.2
    np.testing.assert_allclose(uniqueness(scores), [0.3, 1.0, 0.0, 0.4], atol=1e-6)


def test_representativeness_is_the_similarity_to_the_centre_relative_to_the_cluster_best():
    from index.curate import representativeness

    cluster = np.array([0, 0, 0, 1, 1])
    centrality = np.array([0.9, 0.45, 0.9, 0.8, -0.2], dtype=np.float32)
    np.testing.assert_allclose(representativeness(cluster, centrality), [1.0, 0.5, 1.0, 1.0, 0.0], atol=1e-6)


def test_kmeans_finds_planted_clusters():
    from index.curate import kmeans

    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:3]
    vectors = np.repeat(centres, 20, axis=0) + rng.normal(0, 0.05, size=(60, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cluster, centrality = kmeans(vectors, 3)
    assert [len(set(cluster[i * 20:(i + 1) * 20].tolist())) for i in range(3)] == [1, 1, 1]
    assert len(set(cluster.tolist())) == 3 and centrality.min() > 0.9


def test_outliers_use_the_median_and_mad_of_the_mean_knn_distance():
    from index.curate import outlier_scores

    distances = np.array([0.1, 0.2, 0.2, 0.3, 0.9])  # median 0.2, MAD 0.1: z = 0.6745 * (d - 0.2) / 0.1
    scores = np.repeat((1 - distances)[:, None], 3, axis=1).astype(np.float32)
    score, robust, flag = outlier_scores(scores, 3.5)
    np.testing.assert_allclose(score, distances, atol=1e-6)
    np.testing.assert_allclose(robust, 0.6745 * (distances - 0.2) / 0.1, atol=1e-5)
    assert flag.tolist() == [False, False, False, False, True]  # 0.6745 * 7 = 4.72


def test_label_votes_weight_neighbours_by_similarity():
    from index.curate import label_votes

    labels = np.array([0, 1, 1, 1, 0, -1])
    rows = np.array([[1, 2, 3], [2, 3, 0], [1, 3, 4], [1, 2, -1], [0, 1, 2], [0, 1, 2]])
    scores = np.array([[0.9, 0.8, 0.7], [0.9, 0.9, 0.2], [0.5, 0.5, 0.5], [0.6, 0.4, -np.inf],
                       [0.6, 0.2, 0.2], [0.9, 0.9, 0.9]], dtype=np.float32)
    mistakenness, predicted, share = label_votes(labels, rows, scores)
    np.testing.assert_allclose(mistakenness[:5], [1.0, 0.2 / 2.0, 1 / 3, 0.0, 0.4], atol=1e-6)
    assert np.isnan(mistakenness[5])  # unlabelled
    assert predicted.tolist() == [1, 1, 1, 1, 0, 1]
    np.testing.assert_allclose(share[:5], [1.0, 0.9, 2 / 3, 1.0, 0.6], atol=1e-6)


def test_components_and_group_numbers():
    from index.curate import components, group_numbers

    labels = components(7, np.array([[0, 3], [3, 5], [1, 2]]))
    assert labels.tolist() == [0, 1, 1, 0, 4, 0, 6]
    assert group_numbers(labels).tolist() == [0, 1, 1, 0, -1, 0, -1]  # the largest group first


def test_splits_come_from_the_manifest_then_the_file_name(tmp_path):
    from index.curate import split_column, split_of_shard

    (tmp_path / "manifest.json").write_text(json.dumps({"splits": {"validation": [{"file": "part-0.tar"}]}}))
    assert split_of_shard(str(tmp_path / "part-0.tar")) == "val"
    assert split_of_shard(str(tmp_path / "part-1.tar")) == ""
    assert split_of_shard("/x/train-000003.tar.gz") == "train"
    assert split_of_shard("/x/test.tar") == "test"
    assert split_of_shard("/x/training_7.tar") == "train"
    assert split_of_shard("/x/trainset.tar") == ""  # a word that only starts like a split
    assert split_column(["/x/val-0.tar", "/x/val-0.tar", "/x/eval-1.tar"]) == ["val", "val", "test"]


def test_ids_to_drop_and_the_export_files(tmp_path):
    import pyarrow as pa

    from app.curate_tab import ExportError, export_drop_list, group_members, group_overview, member_caption
    from index.curate import CurationError, ids_to_drop

    near = pa.table({"group": [0, 0, 0, 1, 1], "id": [5, 7, 9, 2, 3], "key": ["e", "g", "i", "b", "c"],
                     "shard": ["s"] * 5, "split": ["test", "train", "train", "train", "train"],
                     "score": [0.99, 0.99, 0.97, 0.96, 0.96], "match_id": [7, 5, 5, 3, 2],
                     "keep": [True, False, False, True, False]})
    leaks = pa.table({"group": [0, 0], "id": [5, 7], "key": ["e", "g"], "shard": ["s", "s"], "split": ["test", "train"],
                      "score": [0.99, 0.99], "match_id": [7, 5], "match_split": ["train", "test"],
                      "drop": [False, True]})
    tables = {"near_duplicates": near, "leaks": leaks}
    dropped = ids_to_drop(tables, ["near_duplicates", "leaks"])
    assert [(row["id"], row["reasons"]) for row in dropped] == [
        (3, ["near_duplicates"]), (7, ["near_duplicates", "leaks"]), (9, ["near_duplicates"])]
    assert group_overview(near) == [[0, 3, 0.99, "test, train", 2], [1, 2, 0.96, "train", 1]]
    assert [row["id"] for row in group_members(near, 1)] == [2, 3]
    assert member_caption(group_members(leaks, 0)[1]) == "g · train · score 0.990 · drop"
    assert member_caption(group_members(near, 0)[0]) == "e · test · score 0.990 · keep"
    with pytest.raises(CurationError, match="no group 4"):
        group_members(near, 4)

    path, count = export_drop_list(tables, ["Near duplicates (all but one per group)", "leaks"], "csv", tmp_path)
    assert count == 3 and path.suffix == ".csv" and path.parent == tmp_path
    assert path.read_text().splitlines() == ["id,key,shard,reasons", "3,c,s,near_duplicates",
                                             "7,g,s,near_duplicates;leaks", "9,i,s,near_duplicates"]
    path, count = export_drop_list(tables, ["leaks"], "json", tmp_path)
    assert json.loads(path.read_text()) == {"count": 1, "ids": [7], "items": [
        {"id": 7, "key": "g", "shard": "s", "reasons": ["leaks"]}]}
    with pytest.raises(ExportError, match="csv or json"):
        export_drop_list(tables, ["leaks"], "xml", tmp_path)
    with pytest.raises(ExportError, match="at least one"):
        export_drop_list(tables, [], "csv", tmp_path)
    with pytest.raises(CurationError, match="cannot drop by"):
        ids_to_drop(tables, ["everything"])


def test_label_mistakes_and_outliers_on_planted_vectors(tmp_path):
    """Three labelled clusters, three items carrying another cluster's label, two vectors far from all."""
    from export.embeddings import metadata_table
    from index.build import build_from_source
    from index.curate import Params, curate
    from index.sources import ArraySource

    rng = np.random.default_rng(1)
    dim, per = 16, 30
    centres = np.eye(dim, dtype=np.float32)[:3]
    vectors = np.repeat(centres, per, axis=0) + rng.normal(0, 0.15, size=(3 * per, dim)).astype(np.float32)
    far = rng.normal(0, 1, size=(2, dim)).astype(np.float32)
    far[:, :3] = 0
    vectors = np.concatenate([vectors, far])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = np.repeat([0, 1, 2], per).tolist() + [0, 1]
    flipped = {4: 1, 40: 2, 70: 0}
    for row, label in flipped.items():
        labels[row] = label
    n = len(vectors)
    ids = np.arange(100, 100 + n)
    table = metadata_table(ids, [f"k{i}" for i in ids], [""] * n, labels, [f"c{label}" for label in labels], [""] * n)
    build_from_source(ArraySource(vectors, ids, table=table), tmp_path / "index")
    result = curate(tmp_path / "index", params=Params(hashes=False), progress=False)
    mistakes = result.tables["label_mistakes"]
    assert sorted(mistakes.column("id").to_pylist()) == sorted(100 + row for row in flipped)
    predicted = dict(zip(mistakes.column("id").to_pylist(), mistakes.column("predicted_label_name").to_pylist()))
    assert predicted == {104: "c0", 140: "c1", 170: "c2"}
    outliers = result.tables["outliers"]  # most isolated first
    assert sorted(outliers.column("id").to_pylist()[:2]) == [100 + 3 * per, 101 + 3 * per]
    robust = outliers.column("outlier_z").to_pylist()
    assert min(robust[:2]) > 2 * max(robust[2:] + [3.5])
    scores = result.tables["scores"]
    assert scores.num_rows == n and set(scores.column("split").to_pylist()) == {""}
    assert result.tables["leaks"].num_rows == 0 and result.summary["exact_duplicates"]["hashed"] is False
    uniqueness = np.asarray(scores.column("uniqueness").to_pylist())
    assert uniqueness.max() == pytest.approx(1.0) and uniqueness[-2:].min() > np.percentile(uniqueness[:-2], 99)


def test_a_single_item_and_an_index_without_shards(tmp_path):
    from index.build import build_arrays
    from index.curate import CurationError, Params, curate

    build_arrays(np.eye(4, dtype=np.float32)[:1], tmp_path / "one")
    result = curate(tmp_path / "one", params=Params(hashes=False), progress=False)
    assert result.summary["near_duplicates"]["groups"] == 0 and result.tables["scores"].num_rows == 1
    with pytest.raises(CurationError, match="--no-hash"):
        curate(tmp_path / "one", progress=False)


# -- the planted CIFAR case -------------------------------------------------------------------------


@dataclass
class Case:
    root: Path
    index: Path
    planted: Planted
    tests: list[dict]
    trains: list[dict]


@pytest.fixture(scope="module")
def planted_case(tmp_path_factory) -> Case:
    if not (CIFAR_DIR / "test-000000.tar.gz").exists():
        pytest.skip(CIFAR_SKIP_REASON)
    from index.build import build_index

    root = tmp_path_factory.mktemp("curate")
    encoder = thumbnail_encoder_dir(root / "onnx")
    tests = read_samples(CIFAR_DIR / "test-000000.tar.gz", 200)
    trains = read_samples(CIFAR_DIR / "train-000000.tar.gz", 100)
    planted = plant(tests, near_per_kind=10, exact=5, train_sources=trains, train_exact=2)
    data = root / "data"
    write_shard(data / "test-000000.tar", tests)
    write_shard(data / "train-000000.tar", trains + planted.samples)
    (data / "manifest.json").write_bytes((CIFAR_DIR / "manifest.json").read_bytes())
    build_index(encoder, str(data / "*.tar"), root / "index", progress=False)
    return Case(root, root / "index", planted, tests, trains)


def test_planted_duplicates_exact_copies_and_leaks_are_found_by_the_cli(planted_case):
    """``python -m index.curate --verify none`` (the embedding alone: this encoder separates copies from
    distinct images); then every table is checked against what was planted."""
    import pyarrow.parquet as pq

    output = planted_case.root / "out"
    done = subprocess.run([sys.executable, "-m", "index.curate", "--index", str(planted_case.index), "--output",
                           str(output), "--no-progress", "--verify", "none"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["count"] == 347 and summary["splits"] == {"test": 200, "train": 147}
    assert sorted(path.name for path in output.iterdir()) == sorted(
        ["curation.json", "exact_duplicates.parquet", "label_mistakes.parquet", "leaks.parquet",
         "near_duplicates.parquet", "outliers.parquet", "scores.parquet"])
    planted = planted_case.planted
    near = pq.read_table(output / "near_duplicates.parquet")
    assert {"group", "id", "key", "score"} <= set(near.column_names)
    metrics = pair_metrics(group_pairs(near), planted.pairs())
    assert metrics["recall"] == 1.0 and metrics["precision"] == 1.0, metrics
    kept = {key for key, keep in zip(near.column("key").to_pylist(), near.column("keep").to_pylist()) if keep}
    assert not kept & set(planted.near), "a planted copy was kept instead of its test source"

    exact = pq.read_table(output / "exact_duplicates.parquet")
    exact_groups = {frozenset(keys) for keys in _groups(exact).values()}
    sources: dict[str, set] = {}
    for copy, source in planted.exact.items():
        sources.setdefault(source, {source}).add(copy)
    assert exact_groups == {frozenset(keys) for keys in sources.values()}

    leaks = pq.read_table(output / "leaks.parquet").to_pylist()
    dropped = {row["key"] for row in leaks if row["drop"]}
    test_copies = {copy for copy, (source, _) in planted.near.items()} | {
        copy for copy, source in planted.exact.items() if source.startswith("test_")}
    assert dropped == test_copies  # 45 train copies of test images: recall 1, precision 1
    scores = pq.read_table(output / "scores.parquet")
    by_id = dict(zip(scores.column("id").to_pylist(), scores.column("key").to_pylist()))
    for row in leaks:
        if row["drop"]:
            source = planted.near[row["key"]][0] if row["key"] in planted.near else planted.exact[row["key"]]
            assert by_id[row["match_id"]] == source and row["split"] == "train" and row["match_split"] == "test"

    assert scores.num_rows == 347
    copies = [key in planted.near or key in planted.exact for key in scores.column("key").to_pylist()]
    uniqueness = np.asarray(scores.column("uniqueness").to_pylist())
    assert uniqueness[copies].max() < np.median(uniqueness[~np.asarray(copies)])  # copies are not unique


def _groups(table) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for group, key in zip(table.column("group").to_pylist(), table.column("key").to_pylist()):
        out.setdefault(int(group), []).append(key)
    return out


def test_planted_margin_and_threshold_option(planted_case, tmp_path):
    """The planted copies sit above 0.95 and distinct images below it (so the test above can fail); a
    threshold of 0.999 keeps only the byte-identical and near-lossless copies."""
    from index.curate import Params, curate

    result = curate(planted_case.index, tmp_path / "strict", Params(threshold=0.999, verify="none"), progress=False)
    near = result.tables["near_duplicates"]
    pairs = group_pairs(near)
    assert pairs < planted_case.planted.pairs() and len(pairs) >= 7
    assert result.summary["params"]["threshold"] == 0.999 and result.summary["params"]["leak_threshold"] == 0.999
    scores = result.tables["scores"]
    keys = scores.column("key").to_pylist()
    nn = np.asarray(scores.column("nn_score").to_pylist())
    planted_keys = set(planted_case.planted.near) | set(planted_case.planted.exact)
    sources = {source for source, _ in planted_case.planted.near.values()} | set(planted_case.planted.exact.values())
    others = np.asarray([key not in planted_keys and key not in sources for key in keys])
    assert nn[~others].min() >= 0.95 > nn[others].max(), (nn[~others].min(), nn[others].max())


def test_cli_errors_name_the_problem(tmp_path, capsys):
    from index.curate import main

    assert main(["--index", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--index", str(tmp_path)]) == 2
    assert "holds no index.json" in capsys.readouterr().err
    assert main(["--index", str(tmp_path), "--threshold", "1.5"]) == 2
    assert "not a cosine similarity" in capsys.readouterr().err
    assert main(["--index", str(tmp_path), "--k", "0"]) == 2
    assert "--k 0" in capsys.readouterr().err


def test_missing_shard_is_a_clear_error(planted_case, tmp_path):
    import shutil

    from index.curate import CurationError, curate

    copy = tmp_path / "index"
    shutil.copytree(planted_case.index, copy)
    from index.search import Index

    index = Index.load(copy)
    moved = Path(index.metadata.column("shard")[0].as_py())
    hidden = moved.with_name(moved.name + ".away")
    moved.rename(hidden)
    try:
        with pytest.raises(CurationError, match="does not exist"):
            curate(copy, progress=False)
    finally:
        hidden.rename(moved)
    assert not (copy / "curation" / "curation.json").exists()


def test_curate_tab_builds_and_exports(planted_case, tmp_path):
    """The tab inside a Blocks: its load, group and export handlers run on the planted case's tables."""
    import gradio as gr

    from app.collection import Collection
    from app.curate_tab import build_curate_tab, export_drop_list
    from index.curate import Params, curate_loaded, is_stale, read_tables
    from index.search import Index

    index = Index.load(planted_case.index)
    collection = Collection(encoder=None, indexes={"images": index})
    curate_loaded(index, tmp_path / "tables", Params(verify="none"), progress=False)
    with gr.Blocks() as demo:
        build_curate_tab(collection, directory=tmp_path / "tables")
    names = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {"mv-curate-groups", "mv-curate-gallery", "mv-curate-download"} <= names
    tables, summary = read_tables(tmp_path / "tables")
    assert not is_stale(summary, index) and summary["index_files"] == index.info["files"]
    path, count = export_drop_list(tables, ["Leaks (the copy in the lower split)"], "json", tmp_path)
    assert count == 45 and len(json.loads(path.read_text())["ids"]) == 45
    records = tables["near_duplicates"].slice(0, 3).to_pylist()
    assert len(collection.thumbs.images(records)) == 3  # the gallery's images come from the shards


# -- pixel verification -----------------------------------------------------------------------------


def test_thumbnails_ignore_colour_shifts_and_contrast_but_not_content():
    from index.curate import thumbnail_vectors

    rng = np.random.default_rng(0)
    image = rng.integers(40, 200, size=(32, 32, 3)).astype(np.float32)
    shifted = np.clip((image - image.mean()) * 1.1 + image.mean() + np.array([12, -9, 5]), 0, 255)
    flat = np.full((32, 32, 3), 77.0)
    other = rng.integers(40, 200, size=(32, 32, 3)).astype(np.float32)
    thumbs = thumbnail_vectors(np.stack([image, shifted, np.rot90(image), flat, other]).astype(np.uint8))
    assert thumbs.shape == (5, 192) and thumbs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(thumbs[[0, 1, 2, 4]], axis=1), 1.0, atol=1e-5)
    assert thumbs[0] @ thumbs[1] > 0.999  # a per-channel affine change cancels out
    assert thumbs[0] @ thumbs[2] < 0.5 and thumbs[0] @ thumbs[4] < 0.5  # other content does not
    assert not thumbs[3].any()  # a flat image verifies with nothing


def test_the_aligned_check_undoes_a_small_crop():
    """A textured image cropped by 2 px on the left and 1 px on top and scaled back: its plain 8x8
    thumbnail cosine drops, the best cosine over the crop warps comes back near 1 (either way round)."""
    from PIL import Image

    from index.curate import ALIGN_SIZE, aligned_scores, crop_matrices, thumbnail_vectors

    matrix = crop_matrices()
    assert matrix.shape == (9 * 8, ALIGN_SIZE)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(matrix[:8], np.kron(np.eye(8), [0.5, 0.5]), atol=1e-6)  # no crop: 2-pixel means
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, size=(16, 16, 3)).astype(np.uint8)
    image = Image.fromarray(noise).resize((32, 32), Image.BICUBIC)
    cropped = image.crop((2, 1, 32, 32)).resize((32, 32), Image.BICUBIC)
    pixels = np.stack([np.asarray(image), np.asarray(cropped)])
    thumbs = thumbnail_vectors(pixels)
    small = np.round(pixels.astype(np.float32).reshape(2, 16, 2, 16, 2, 3).mean(axis=(2, 4))).astype(np.uint8)
    plain = float(thumbs[0] @ thumbs[1])
    aligned = aligned_scores(small[[0, 1]], thumbs[[1, 0]])
    assert plain < 0.85 and aligned[0] > 0.97 and aligned[0] > plain + 0.1, (plain, aligned)
    other = rng.integers(0, 256, size=(8, 8, 3)).astype(np.uint8)
    unrelated = thumbnail_vectors(np.asarray(Image.fromarray(other).resize((32, 32), Image.BICUBIC))[None])
    assert aligned_scores(small[:1], unrelated)[0] < 0.6  # warps do not make unrelated images agree


def test_verification_removes_the_false_pairs_of_a_collapsed_encoder(planted_case, tmp_path):
    """A 2x2-thumbnail encoder (12 numbers) collapses distinct CIFAR images together: the embedding alone
    (``--verify none``) groups many unplanted pairs. With pixel verification (the default, via the CLI)
    every group pair was planted, every JPEG / colour / byte-identical copy is still found, and only planted
    train copies of test images are dropped as leaks."""
    import pyarrow.parquet as pq

    from index.build import build_index
    from index.curate import DEFAULT_VERIFY_THRESHOLD, Params, curate

    build_index(thumbnail_encoder_dir(tmp_path / "onnx2", grid=2), str(planted_case.root / "data" / "*.tar"),
                tmp_path / "index", progress=False)
    planted = planted_case.planted
    loose = curate(tmp_path / "index", tmp_path / "none", Params(verify="none", hashes=False), progress=False)
    unverified = pair_metrics(group_pairs(loose.tables["near_duplicates"]), planted.pairs())
    assert unverified["found"] - unverified["true"] >= 100, unverified  # embeddings alone: false pairs

    output = tmp_path / "verified"
    done = subprocess.run([sys.executable, "-m", "index.curate", "--index", str(tmp_path / "index"), "--output",
                           str(output), "--no-progress", "--no-hash"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads((output / "curation.json").read_text())
    verification = summary["verification"]
    assert verification["mode"] == "thumbnail" and verification["threshold"] == DEFAULT_VERIFY_THRESHOLD
    assert verification["pairs_rejected"] > 0 and verification["thumbnail"]["grid"] == 8
    near = pq.read_table(output / "near_duplicates.parquet")
    found = group_pairs(near)
    metrics = pair_metrics(found, planted.pairs())
    assert metrics["precision"] == 1.0, metrics
    easy = {frozenset((copy, source)) for copy, (source, kind) in planted.near.items() if kind in ("jpeg", "colour")}
    easy |= {pair for pair in planted.pairs() if any(key in planted.exact for key in pair)}
    assert easy <= found, sorted(tuple(pair) for pair in easy - found)
    assert min(near.column("pixel_score").to_pylist()) >= DEFAULT_VERIFY_THRESHOLD
    leaks = pq.read_table(output / "leaks.parquet")
    assert "pixel_score" in leaks.column_names
    dropped = {row["key"] for row in leaks.to_pylist() if row["drop"]}
    test_copies = set(planted.near) | {copy for copy, source in planted.exact.items() if source.startswith("test_")}
    assert dropped <= test_copies and len(dropped) >= 25, (len(dropped), dropped - test_copies)


# -- the Curate tab in Chromium --------------------------------------------------------------------


CHROMIUM = "/usr/bin/chromium"


def test_curate_tab_in_chromium_computes_browses_a_group_and_exports(planted_case, tmp_path):
    """The served app's Curate tab, clicked through as a person would: **Compute now** writes the tables beside
    the index, a click on a near-duplicate group shows its members from the shards, and **Export** offers
    the leaks' ids as a JSON download whose ids are the leaks table's."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)")
    import shutil

    from app.ui import build_app, launch_app
    from export.runtime import Encoder
    from index.curate import read_tables
    from index.search import Index
    from server_helpers import free_port

    index_dir = tmp_path / "index"  # a copy: Compute now writes INDEX/curation
    shutil.copytree(planted_case.index, index_dir)
    demo = build_app(Encoder(planted_case.root / "onnx"), Index.load(index_dir))
    url = launch_app(demo, port=free_port(), block=False)
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, timeout=30_000, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.set_default_timeout(60_000)
                page.goto(url, wait_until="domcontentloaded")
                page.get_by_role("tab", name="Curate").click()
                page.locator("#mv-curate-compute").click()
                _wait_for_text(page, "#mv-curate-status", "near-duplicate groups (pixel-verified, thumbnail cosine")
                tables, _ = read_tables(index_dir / "curation")
                groups = tables["near_duplicates"].column("group").to_pylist()
                assert groups, "the planted copies form near-duplicate groups"
                cell = page.locator('#mv-curate-groups [data-testid="cell-0-0"]')  # the first group shown
                first = int(cell.inner_text().strip())
                cell.click()
                page.wait_for_function("() => document.querySelectorAll('#mv-curate-gallery img').length >= 2")
                _wait_for_text(page, "#mv-curate-group-status", f"Group {first}: {groups.count(first)} members")
                page.locator("#mv-curate-include").get_by_label("Leaks", exact=False).check()
                page.locator("#mv-curate-format").get_by_label("json").check()
                page.locator("#mv-curate-export-button").click()
                _wait_for_text(page, "#mv-curate-export-status", "ids to drop")
                with page.expect_download() as download_info:
                    page.locator("#mv-curate-download a").first.click()
                exported = json.loads(Path(download_info.value.path()).read_text())
            finally:
                browser.close()
    finally:
        demo.close()
    leaks = set(tables["leaks"].filter(tables["leaks"].column("drop")).column("id").to_pylist())
    assert leaks and leaks <= set(exported["ids"]), (len(leaks), len(exported["ids"]))


def _wait_for_text(page, selector: str, needle: str) -> None:
    page.wait_for_function("([s, n]) => (document.querySelector(s)?.innerText || '').includes(n)",
                           arg=[selector, needle])
