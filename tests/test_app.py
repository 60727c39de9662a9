"""Unit tests of the search app: the plain search functions on a real (tiny) ONNX encoder + FAISS index,
and the ``python -m app`` command-line errors. No browser; see ``test_app_browser.py`` for that.

The collection is the first 200 CIFAR-10 test images when ``../shared/data/cifar10`` is present, else a
generated shard (so these tests always run).
"""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

try:  # pytest's default "prepend" import mode puts tests/ itself on sys.path (as the other tests assume)
    from onnx_fixtures import CIFAR_DIR, add_int8_variant, cifar_subset_shard, make_onnx_dir, make_shard, shared_onnx_dir
except ImportError:  # e.g. --import-mode=importlib, or tests/ made a package
    from tests.onnx_fixtures import (
        CIFAR_DIR, add_int8_variant, cifar_subset_shard, make_onnx_dir, make_shard, shared_onnx_dir,
    )

from app.__main__ import main
from app.ui import (
    Hit,
    SearchError,
    UnreadableUpload,
    build_app,
    clamp_k,
    model_card_markdown,
    neighbours_for_id,
    neighbours_for_image,
    neighbours_for_text,
    run_search,
    search_image,
    search_text,
    status_line,
)

REPO = Path(__file__).resolve().parents[1]
CAPTION = re.compile(r"^.+ · score -?\d\.\d{3}$")
COLLECTION_SIZE = 200


def make_collection(tmp_path_factory: pytest.TempPathFactory, count: int = COLLECTION_SIZE) -> tuple[Path, Path]:
    """A tiny text+image ONNX encoder and an index of ``count`` images; returns (onnx_dir, index_dir)."""
    from index.build import build_index

    onnx_dir = shared_onnx_dir(tmp_path_factory, with_text=True)
    data_dir = tmp_path_factory.mktemp("app-data")
    if (CIFAR_DIR / "test-000000.tar.gz").exists():
        shard = cifar_subset_shard(data_dir / "test-000000.tar", count=count)
    else:
        shard = make_shard(data_dir / "test-000000.tar", count=count)
    index_dir = tmp_path_factory.mktemp("app-index")
    build_index(onnx_dir, str(shard), index_dir, progress=False)
    return onnx_dir, index_dir


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_collection(tmp_path_factory)


@pytest.fixture(scope="module")
def encoder(collection: tuple[Path, Path]) -> Any:
    from export.runtime import Encoder

    return Encoder(collection[0])


@pytest.fixture(scope="module")
def index(collection: tuple[Path, Path]) -> Any:
    from index.search import Index

    return Index.load(collection[1])


@pytest.fixture(scope="module")
def small_index(tmp_path_factory: pytest.TempPathFactory, collection: tuple[Path, Path]) -> Any:
    """An index of only 5 images, to check that k is clamped to the collection."""
    from index.build import build_index
    from index.search import Index

    shard = make_shard(tmp_path_factory.mktemp("small-data") / "small-000000.tar", count=5)
    out = tmp_path_factory.mktemp("small-index")
    build_index(collection[0], str(shard), out, progress=False)
    return Index.load(out)


# ---------------------------------------------------------------------------------------------------
# search functions
# ---------------------------------------------------------------------------------------------------


def test_text_search_returns_k_captioned_images(encoder: Any, index: Any) -> None:
    from PIL import Image

    results = search_text(encoder, index, "a photo of a ship", 8)
    assert len(results) == 8
    for image, caption in results:
        assert isinstance(image, Image.Image)
        assert CAPTION.match(caption), caption
    scores = [float(caption.rsplit(" ", 1)[1]) for _, caption in results]
    assert scores == sorted(scores, reverse=True)


def test_captions_use_label_name(encoder: Any, index: Any) -> None:
    hits = neighbours_for_text(encoder, index, "a photo of a cat", 5)
    names = {str(hit.record.get("label_name") or "") for hit in hits}
    assert all(names), "the fixture shards carry class names via manifest.json"
    assert all(hit.caption.startswith(f"{hit.record['label_name']} · score ") for hit in hits)


def test_image_search_finds_the_indexed_image_first(encoder: Any, index: Any) -> None:
    sample_id = int(index.ids[17])
    hits = neighbours_for_image(encoder, index, index.image(sample_id), 8)
    assert len(hits) == 8
    assert hits[0].id == sample_id
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    pairs = search_image(encoder, index, index.image(sample_id), 3)
    assert len(pairs) == 3 and CAPTION.match(pairs[0][1])


def test_image_search_accepts_paths_bytes_and_arrays(encoder: Any, index: Any, tmp_path: Path) -> None:
    sample_id = int(index.ids[3])
    image = index.image(sample_id)
    path = tmp_path / "query.png"
    image.save(path)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    for query in (str(path), path, buffer.getvalue(), np.asarray(image), image.convert("L")):
        hits = neighbours_for_image(encoder, index, query, 4)
        assert len(hits) == 4
    assert neighbours_for_image(encoder, index, str(path), 1)[0].id == sample_id


def test_more_like_this_starts_with_the_clicked_sample(encoder: Any, index: Any) -> None:
    sample_id = int(index.ids[42])
    hits = neighbours_for_id(encoder, index, sample_id, 6)
    assert len(hits) == 6 and hits[0].id == sample_id


def test_unknown_sample_id_gives_a_message(encoder: Any, index: Any) -> None:
    missing = int(index.ids.max()) + 12345
    with pytest.raises(SearchError, match=f"#{missing}"):
        neighbours_for_id(encoder, index, missing, 5)


def test_k_is_clamped(encoder: Any, index: Any, small_index: Any) -> None:
    assert len(search_text(encoder, small_index, "a photo of a dog", 40)) == 5
    assert len(search_image(encoder, small_index, small_index.image(int(small_index.ids[0])), 50)) == 5
    assert len(search_text(encoder, index, "a photo of a dog", 500)) == 50
    assert len(search_text(encoder, index, "a photo of a dog", 0)) == 1
    assert clamp_k(8.0, 200) == 8 and clamp_k("12", 200) == 12 and clamp_k(None, 200) == 8
    assert clamp_k(30, 5) == 5 and clamp_k(-3, 5) == 1 and clamp_k(3, 0) == 1


@pytest.mark.parametrize(
    "upload, message",
    [
        (None, "Upload an image first"),
        (b"definitely not an image" * 4, "not a readable image"),
        (UnreadableUpload("Could not read x.png as an image"), "Could not read x.png"),
        (12345, "not an image"),
    ],
)
def test_bad_upload_gives_a_message(encoder: Any, index: Any, upload: Any, message: str) -> None:
    with pytest.raises(SearchError, match=message):
        search_image(encoder, index, upload, 8)


def test_truncated_image_file_gives_a_message(encoder: Any, index: Any, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    index.image(int(index.ids[0])).resize((64, 64)).save(buffer, format="JPEG")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(buffer.getvalue()[:200])
    with pytest.raises(SearchError, match="not a readable image"):
        search_image(encoder, index, str(broken), 8)


def test_empty_text_query_gives_a_message(encoder: Any, index: Any) -> None:
    with pytest.raises(SearchError, match="Type a text query"):
        search_text(encoder, index, "   ", 8)


def test_image_only_encoder_refuses_text(tmp_path_factory: pytest.TempPathFactory, index: Any) -> None:
    from export.runtime import Encoder

    image_only = Encoder(shared_onnx_dir(tmp_path_factory, with_text=False))
    assert not image_only.has_text
    with pytest.raises(SearchError, match="no text tower"):
        search_text(image_only, index, "a photo of a ship", 8)
    assert len(search_image(image_only, index, index.image(int(index.ids[0])), 3)) == 3


def test_handler_reports_errors_in_the_status_line() -> None:
    def failing() -> list[Hit]:
        raise SearchError("Upload an image first.")

    gallery, ids, status = run_search(failing, "the uploaded image")
    assert gallery == [] and ids == [] and "Upload an image first." in status


def test_handler_survives_unexpected_errors(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> list[Hit]:
        raise RuntimeError("faiss exploded")

    gallery, ids, status = run_search(broken, "'a ship'")
    assert gallery == [] and ids == [] and status == "⚠️ Search failed (RuntimeError): faiss exploded"
    assert "faiss exploded" in caplog.text


def test_handler_escapes_markdown_in_the_status() -> None:
    _, _, status = run_search(lambda: [], "'*bold* <img src=x> $x$'")
    assert status.startswith(r"0 results for '\*bold\* \<img src=x\> \$x\$' in ")


def test_handler_returns_gallery_ids_and_status(encoder: Any, index: Any) -> None:
    gallery, ids, status = run_search(lambda: neighbours_for_text(encoder, index, "a ship", 8), "'a ship'")
    assert len(gallery) == len(ids) == 8
    assert re.fullmatch(r"8 results for 'a ship' in \d+ ms", status), status
    assert gallery[0][0].size == (32, 32), "tiny images are sent as they are (the browser scales them up)"
    from app.thumbnails import thumbnail
    from PIL import Image

    assert thumbnail(Image.new("RGB", (1000, 500))).size == (256, 128)  # large ones are scaled down
    assert thumbnail(Image.new("RGB", (32, 32)), min_side=128).size == (128, 128)


def test_status_line_wording() -> None:
    assert status_line(8, "'a photo of a ship'", 0.0123) == "8 results for 'a photo of a ship' in 12 ms"
    assert status_line(1, "the uploaded image", 0.002) == "1 result for the uploaded image in 2 ms"


def test_hit_label_falls_back_to_caption_then_id() -> None:
    assert Hit(1, 0.5, {"label_name": "ship", "caption": "a ship"}).caption == "ship · score 0.500"
    assert Hit(2, 0.25, {"label_name": "", "caption": "a red car"}).label == "a red car"
    assert Hit(3, 0.1, {}).label == "#3"


def test_model_card_lists_model_and_index(encoder: Any, index: Any) -> None:
    card = model_card_markdown(encoder, index)
    assert "**Model**" in card and "**Index**" in card
    assert "fixture" in card  # encoder.info["model"]["objective"]
    assert str(index.count) in card and str(index.dim) in card


def test_app_says_which_variant_and_provider_it_runs(collection: tuple[Path, Path], index: Any, tmp_path: Path) -> None:
    """On a CPU the app's encoder is the int8 variant when exported; the model card, the page title and
    the startup notes say so (and when the index was built with another variant)."""
    import shutil

    from app.__main__ import build_collections, build_parser, variant_note
    from export.runtime import Encoder

    int8_dir = add_int8_variant(shutil.copytree(collection[0], tmp_path / "onnx"))
    args = build_parser().parse_args(["--encoder", str(int8_dir), "--index", str(collection[1])])
    served, _ = build_collections(args)
    assert served.encoder.precision == "int8"
    card = model_card_markdown(served.encoder, index)
    assert "| encoder variant | int8 |" in card and "| execution provider | CPUExecutionProvider |" in card
    title = [c for c in build_app(served.encoder, index).get_config_file()["components"]
             if c.get("props", {}).get("elem_id") == "mv-title"]
    assert "encoder: int8 variant on CPUExecutionProvider" in title[0]["props"]["value"]
    assert index.info["encoder_variant"] == "fp32"  # the shared index was built before the int8 file existed
    note = variant_note(served.encoder, index)
    assert note and "fp32 variant" in note and "--precision fp32" in note
    refused = build_collections(build_parser().parse_args(["--encoder", str(int8_dir), "--index", str(collection[1]),
                                                           "--precision", "fp32"]))[0]
    assert refused.encoder.precision == "fp32" and variant_note(refused.encoder, index) is None
    assert variant_note(Encoder(int8_dir, precision="int8"), index)


def test_build_app_makes_blocks(encoder: Any, index: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    import gradio as gr

    assert isinstance(build_app(encoder, index), gr.Blocks)
    from export.runtime import Encoder

    image_only = Encoder(shared_onnx_dir(tmp_path_factory, with_text=False))
    demo = build_app(image_only, index)
    config = demo.get_config_file()
    query = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "mv-query"]
    assert query and query[0]["props"]["interactive"] is False


def test_serving_does_not_import_torch(collection: tuple[Path, Path]) -> None:
    code = (
        "import sys\n"
        "from export.runtime import Encoder\n"
        "from index.search import Index\n"
        "from app.ui import build_app, search_text\n"
        "import app.__main__\n"
        f"e = Encoder({str(collection[0])!r}); i = Index.load({str(collection[1])!r})\n"
        "build_app(e, i); assert len(search_text(e, i, 'a ship', 3)) == 3\n"
        "from app.collection import Collection\n"
        "from app import diagnostics, map_tab\n"
        "c = Collection(encoder=e, indexes={'images': i}, map_points=40, diagnostics_count=40)\n"
        "assert map_tab.MapModel(c).state('PCA', 'label', 10)['count'] == i.count\n"
        "r = diagnostics.compute(c); diagnostics.norm_histogram(r['norms'])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'open_clip', 'timm'))\n"
        "assert not bad, bad\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), GRADIO_ANALYTICS_ENABLED="False")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------


def test_cli_missing_encoder_dir(tmp_path: Path, collection: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nope" / "onnx"
    assert main(["--encoder", str(missing), "--index", str(collection[1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: encoder directory") and str(missing) in err and "does not exist" in err
    assert "Traceback" not in err


def test_cli_missing_index_dir(tmp_path: Path, collection: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "index"
    assert main(["--encoder", str(collection[0]), "--index", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: index directory") and str(missing) in err and "does not exist" in err


def test_cli_broken_index_dir(tmp_path: Path, collection: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    assert main(["--encoder", str(collection[0]), "--index", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot load index {tmp_path}") and "index.json" in err


def test_cli_dimension_mismatch(tmp_path: Path, collection: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    other = make_onnx_dir(tmp_path / "onnx8", with_text=False, dim=8)
    assert main(["--encoder", str(other), "--index", str(collection[1])]) == 2
    err = capsys.readouterr().err
    assert f"error: encoder {other} gives 8-d embeddings but index {collection[1]} holds 16-d vectors" in err


def test_cli_has_no_share_option(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--encoder", "x", "--index", "y", "--share"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --share" in capsys.readouterr().err


def test_python_m_app_reports_without_traceback(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), GRADIO_ANALYTICS_ENABLED="False")
    result = subprocess.run(
        [sys.executable, "-m", "app", "--encoder", str(tmp_path / "onnx"), "--index", str(tmp_path / "index")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: encoder directory {tmp_path / 'onnx'} does not exist "
        "(make it with `python -m export --model RUN/model --output RUN/onnx`)"
    )


def test_cli_port_in_use(collection: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = main(["--encoder", str(collection[0]), "--index", str(collection[1]), "--port", str(port)])
    assert code == 2
    assert f"error: cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# filters and history
# ---------------------------------------------------------------------------------------------------


def test_result_filter_matches_labels_and_whole_caption_words() -> None:
    from app.search import ResultFilter

    ship = {"label_name": "ship", "caption": "A photo of a ship."}
    cat = {"label_name": "cat", "caption": "a photo of a cat"}
    assert not ResultFilter.parse(None, "").active
    assert ResultFilter.parse(["ship", "truck"], "").matches(ship) and not ResultFilter.parse(["truck"], "").matches(ship)
    assert ResultFilter.parse("cat", None).labels == ("cat",)
    assert ResultFilter.parse([], "PHOTO ship").matches(ship)  # case-insensitive, every word
    assert not ResultFilter.parse([], "photo ship").matches(cat)
    assert not ResultFilter.parse([], "shi").matches(ship)  # whole words, not substrings
    assert ResultFilter.parse(["cat"], "photo").describe() == "label cat, caption with 'photo'"


def test_filtered_search_returns_only_matching_results(encoder: Any, index: Any) -> None:
    from app.search import ResultFilter

    names = sorted({str(r["label_name"]) for r in index.records(index.ids[:50])})
    wanted = names[1]
    hits = neighbours_for_text(encoder, index, "a photo of a ship", 6, ResultFilter.parse([wanted], ""))
    assert len(hits) == 6 and {hit.record["label_name"] for hit in hits} == {wanted}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    word = str(index.records([int(index.ids[0])])[0]["caption"]).split()[-1].strip(".").lower()
    for hit in neighbours_for_text(encoder, index, "a photo", 5, ResultFilter.parse([], word)):
        assert word in hit.record["caption"].lower()
    assert neighbours_for_text(encoder, index, "a ship", 5, ResultFilter.parse(["no such label"], "")) == []
    _, _, status = run_search(lambda: [], "'x'", 5, ResultFilter.parse(["no such label"], ""))
    assert "filter: label no such label; no more among the nearest" in status


def test_history_keeps_newest_first_without_duplicates() -> None:
    from app.search import find_history, history_label, push_history

    history: list = []
    for query in ("a ship", "a cat", "a ship"):
        history = push_history(history, {"kind": "text", "query": query})
    assert [history_label(entry) for entry in history] == ["text: a ship", "text: a cat"]
    history = push_history(history, {"kind": "id", "id": 17, "name": "frog"})
    assert history_label(history[0]) == "sample #17 (frog)"
    assert find_history(history, "text: a cat") == {"kind": "text", "query": "a cat"}
    assert find_history(history, "text: nothing") is None
    for number in range(30):
        history = push_history(history, {"kind": "text", "query": f"q{number}"}, limit=5)
    assert len(history) == 5 and history_label(history[0]) == "text: q29"


# ---------------------------------------------------------------------------------------------------
# diagnostics, worked by hand
# ---------------------------------------------------------------------------------------------------


def test_alignment_and_uniformity_by_hand() -> None:
    from app.diagnostics import alignment, uniformity

    # distances sqrt(2) and 0 -> squared 2 and 0 -> mean 1
    assert alignment(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[0.0, 1.0], [0.0, 1.0]])) == pytest.approx(1.0)
    # one pair at squared distance 4: log exp(-2 * 4) = -8
    assert uniformity(np.array([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-8.0)
    # pairs at squared distances 4, 0, 4: log((e^-8 + 1 + e^-8) / 3)
    three = np.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    assert uniformity(three) == pytest.approx(np.log((2 * np.exp(-8.0) + 1.0) / 3.0))
    assert uniformity(np.ones((4, 3)) / np.sqrt(3)) == pytest.approx(0.0, abs=1e-9)  # collapsed
    with pytest.raises(ValueError):
        uniformity(np.ones((1, 3)))


def test_weighted_knn_vote_and_zero_shot_by_hand() -> None:
    from app.diagnostics import accuracy, recall, weighted_knn_predict, zero_shot_predict

    labels, scores = np.array([[0, 1, 1]]), np.array([[0.9, 0.5, 0.5]])
    # tau 0.1: weights 1 (class 0) vs 2 e^-4 = 0.037 (class 1); tau 1: 1 vs 2 e^-0.4 = 1.34
    assert weighted_knn_predict(labels, scores, tau=0.1).tolist() == [0]
    assert weighted_knn_predict(labels, scores, tau=1.0).tolist() == [1]
    assert weighted_knn_predict(np.array([[-1, -1]]), np.array([[0.5, 0.4]])).tolist() == [-1]
    assert zero_shot_predict(np.eye(2), np.array([[0.0, 1.0], [1.0, 0.0]]), [7, 3]).tolist() == [3, 7]
    assert accuracy(np.array([1, 2, 3, 4]), np.array([1, 0, 3, -1])) == pytest.approx(2 / 3)
    assert recall(np.array([[1, 2, 3], [5, 6, -1]]), np.array([[1, 2, 4], [5, 6, 7]])) == pytest.approx((2 / 3 + 2 / 3) / 2)


def test_metrics_curve_and_lookup(tmp_path: Path) -> None:
    from app.diagnostics import curve, find_metrics, read_metrics, training_curve

    run = tmp_path / "run"
    (run / "onnx").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 3.5}\n{"step": 20, "loss": 3.0, "embedding_std": 0.9}\n'
                                       'not json\n{"note": "no step"}\n{"step": 30, "loss": NaN}\n{"step": 3')
    assert find_metrics(run / "onnx") == (run / "metrics.jsonl").resolve()
    assert find_metrics(tmp_path / "elsewhere") is None
    records = read_metrics(find_metrics(run / "onnx"))
    assert [r["step"] for r in records] == [10, 20, 30]
    assert curve(records, "loss") == ([10.0, 20.0], [3.5, 3.0])  # NaN dropped
    assert training_curve(records) is not None and training_curve([]) is None


def test_diagnostics_on_the_collection(encoder: Any, index: Any) -> None:
    from app.collection import Collection
    from app.diagnostics import compute, figures_markdown

    collection = Collection(encoder=encoder, indexes={"images": index}, map_points=60, diagnostics_count=50)
    result = compute(collection)
    assert result["sample"] == 50 and len(result["norms"]) == 50 and result["norms_raw"]
    assert 0.0 <= result["alignment"] <= 4.0 and -4.0 <= result["uniformity"] <= 0.0
    assert 0.0 <= result["knn_top1"] <= 1.0 and 0.0 <= result["zero_shot_top1"] <= 1.0
    assert result["recall"] == pytest.approx(1.0)  # a Flat index is exact
    table = figures_markdown(result)
    assert "kNN top-1" in table and "zero-shot top-1 (10 classes)" in table and "recall@10" in table
    sample = collection.sample()
    assert len(sample.ids) == 60 and sample.vectors.shape == (60, index.dim)
    assert np.allclose(sample.vectors, encoder.encode_images(sample.images), atol=1e-4)  # stored = re-encoded


# ---------------------------------------------------------------------------------------------------
# thumbnails from the shards
# ---------------------------------------------------------------------------------------------------


def test_thumbnail_store_reads_plain_and_compressed_shards(tmp_path: Path) -> None:
    from app.thumbnails import ThumbnailStore, sprite_sheet
    from trainer.data.shards import iter_shard

    plain = make_shard(tmp_path / "a" / "plain-000000.tar", count=6)
    packed = make_shard(tmp_path / "b" / "packed-000000.tar.gz", count=6, start=100)
    expected = {(str(shard), s.key): s.image for shard in (plain, packed) for s in iter_shard(str(shard))}
    store = ThumbnailStore(budget_bytes=1)
    records = [{"shard": shard, "key": key} for (shard, key) in expected][::-1]
    assert store.encoded(records) == [expected[(r["shard"], r["key"])] for r in records]
    assert store.images(records[:1])[0].size == (32, 32)
    with pytest.raises(KeyError, match="no image for key"):
        store.encoded([{"shard": str(plain), "key": "missing"}])
    with pytest.raises(FileNotFoundError):
        store.encoded([{"shard": str(tmp_path / "gone.tar"), "key": "x"}])
    sheet, columns = sprite_sheet(store.images(records), cell=8)
    from PIL import Image

    assert columns == 4 and Image.open(io.BytesIO(sheet)).size == (32, 24)  # 12 tiles: 4 x 3


# ---------------------------------------------------------------------------------------------------
# safety
# ---------------------------------------------------------------------------------------------------


def test_auth_parsing() -> None:
    from app.safety import SafetyError, auth_from, parse_auth

    assert parse_auth("alice:secret") == [("alice", "secret")]
    assert parse_auth("alice:s:e:c, bob:pw") == [("alice", "s:e:c"), ("bob", "pw")]
    assert parse_auth(None) == [] and parse_auth("  ") == []
    for bad in ("alice", ":pw", "alice:", "alice:pw,"):
        with pytest.raises(SafetyError, match="user:password"):
            parse_auth(bad)
    assert auth_from(None, {"MANYVIEW_AUTH": "u:p"}) == [("u", "p")]
    assert auth_from("x:y", {"MANYVIEW_AUTH": "u:p"}) == [("x", "y")]  # the flag wins
    assert auth_from(None, {}) == []


def test_sizes_exposure_and_paths(tmp_path: Path) -> None:
    from app.safety import SafetyError, blocked_paths, exposure_warning, inside, parse_size

    assert parse_size("25mb") == 25_000_000 and parse_size("500 KB") == 500_000 and parse_size("1024") == 1024
    for bad in ("lots", "-3mb", "0"):
        with pytest.raises(SafetyError):
            parse_size(bad)
    assert exposure_warning("127.0.0.1", []) is None and exposure_warning("localhost", []) is None
    assert exposure_warning("0.0.0.0", [("u", "p")]) is None
    assert "without --auth" in exposure_warning("0.0.0.0", [])
    root = tmp_path / "index"
    (root / "sub").mkdir(parents=True)
    assert inside(root / "sub" / "x.faiss", [root]) and not inside(root / ".." / "secret", [root])
    link = root / "escape"
    link.symlink_to(tmp_path)
    assert not inside(link / "secret", [root])  # symlinks are resolved
    assert blocked_paths(root, None, root / "sub", shards=[str(root / "sub" / "s.tar")]) == [str(root.resolve()),
                                                                                            str((root / "sub").resolve())]


def test_served_app_needs_login_and_serves_no_files(encoder: Any, index: Any, collection: tuple[Path, Path]) -> None:
    import http.cookiejar
    import socket
    import urllib.error
    import urllib.parse
    import urllib.request

    from app.ui import launch_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo = build_app(encoder, index)
    url = launch_app(demo, port=port, block=False, auth=[("alice", "secret")], blocked=[str(collection[1])])
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def get(path: str, form: dict | None = None) -> tuple[int, str]:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        try:
            with opener.open(urllib.request.Request(url.rstrip("/") + path, data=data), timeout=10) as response:
                return response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")

    try:
        assert get("/config")[0] == 401  # nothing without a login
        assert get("/login", {"username": "alice", "password": "wrong"})[0] in (400, 401)
        assert get("/login", {"username": "alice", "password": "secret"})[0] == 200
        assert get("/config")[0] == 200
        for path in ("/etc/passwd", str(collection[1] / "index.json"), str(REPO / "README.md")):
            status, body = get(f"/gradio_api/file={path}")
            assert status in (403, 404), (path, status)
            assert "root:" not in body and '"factory"' not in body
    finally:
        demo.close()


def test_cli_rejects_bad_safety_options(collection: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    base = ["--encoder", str(collection[0]), "--index", str(collection[1])]
    assert main([*base, "--auth", "nopassword"]) == 2
    assert "error: auth must be user:password" in capsys.readouterr().err
    assert main([*base, "--max-upload", "huge"]) == 2
    assert "error: cannot read the size 'huge'" in capsys.readouterr().err
    assert main([*base, "--compare-encoder", str(collection[0])]) == 2
    assert "error: give both --compare-encoder and --compare-index" in capsys.readouterr().err
    assert main([*base, "--map-limit", "0"]) == 2
    assert "error: --map-limit must be at least 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# caption index and the assembled app
# ---------------------------------------------------------------------------------------------------


def test_caption_index_and_full_app(encoder: Any, index: Any, collection: tuple[Path, Path], tmp_path: Path) -> None:
    import gradio as gr

    from app.caption_index import build_caption_index
    from app.collection import Collection
    from index.search import Index

    info = build_caption_index(str(collection[0]), str(collection[1]), str(tmp_path / "captions"))
    assert info["modality"] == "text" and info["count"] == index.count
    captions = Index.load(tmp_path / "captions")
    record = index.records([int(index.ids[9])])[0]
    hits = neighbours_for_text(encoder, captions, record["caption"], 3)
    assert hits[0].record["caption"] == record["caption"] and hits[0].score == pytest.approx(1.0, abs=1e-4)
    other = Collection(encoder=encoder, indexes={"images": index}, name="B")
    demo = build_app(encoder, index, text_index=captions, compare=other)
    assert isinstance(demo, gr.Blocks)
    elem_ids = {c.get("props", {}).get("elem_id") for c in demo.get_config_file()["components"]}
    assert {"mv-gallery", "mv-index", "mv-map", "mv-diag-run", "mv-cmp-gallery-a", "mv-cmp-gallery-b"} <= elem_ids


def test_map_draws_every_point_up_to_map_limit(encoder: Any, index: Any) -> None:
    from app.collection import Collection
    from app.map_tab import MapModel

    collection = Collection(encoder=encoder, indexes={"images": index}, map_limit=30, diagnostics_count=50)
    state = MapModel(collection).state("PCA", "label", 10)
    assert state["count"] == 30 and "PCA of a random 30 of the 200 indexed points" in state["caption"]
    assert MapModel(Collection(encoder=encoder, indexes={"images": index})).state("PCA", "label", 10)["count"] == 200
    clustered = MapModel(collection).state("UMAP", "k-means cluster", 3)  # UMAP falls back to PCA when not installed
    assert {name for name, _, _ in clustered["legend"]} <= {"cluster 0", "cluster 1", "cluster 2"}


def test_cached_values_may_use_other_cached_values(encoder: Any, index: Any) -> None:
    import threading

    from app.collection import Collection

    collection = Collection(encoder=encoder, indexes={"images": index})
    calls = []
    outer = threading.Thread(target=lambda: calls.append(collection.cached("outer", lambda: collection.cached("inner", lambda: 7) + 1)))
    outer.start()
    outer.join(timeout=10)
    assert not outer.is_alive(), "nested cached() deadlocked"
    assert calls == [8] and collection.cached("outer", lambda: 0) == 8
