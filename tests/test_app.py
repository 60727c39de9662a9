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
    from onnx_fixtures import CIFAR_DIR, cifar_subset_shard, make_onnx_dir, make_shard, shared_onnx_dir
except ImportError:  # e.g. --import-mode=importlib, or tests/ made a package
    from tests.onnx_fixtures import CIFAR_DIR, cifar_subset_shard, make_onnx_dir, make_shard, shared_onnx_dir

from app.__main__ import main
from app.ui import (
    Hit,
    SearchError,
    UnreadableUpload,
    _run,
    build_app,
    clamp_k,
    model_card_markdown,
    neighbours_for_id,
    neighbours_for_image,
    neighbours_for_text,
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

    gallery, ids, status = _run(failing, "the uploaded image")
    assert gallery == [] and ids == [] and "Upload an image first." in status


def test_handler_survives_unexpected_errors(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> list[Hit]:
        raise RuntimeError("faiss exploded")

    gallery, ids, status = _run(broken, "'a ship'")
    assert gallery == [] and ids == [] and status == "⚠️ Search failed (RuntimeError): faiss exploded"
    assert "faiss exploded" in caplog.text


def test_handler_escapes_markdown_in_the_status() -> None:
    _, _, status = _run(lambda: [], "'*bold* <img src=x> $x$'")
    assert status.startswith(r"0 results for '\*bold\* \<img src=x\> \$x\$' in ")


def test_handler_returns_gallery_ids_and_status(encoder: Any, index: Any) -> None:
    gallery, ids, status = _run(lambda: neighbours_for_text(encoder, index, "a ship", 8), "'a ship'")
    assert len(gallery) == len(ids) == 8
    assert re.fullmatch(r"8 results for 'a ship' in \d+ ms", status), status
    assert min(gallery[0][0].size) >= 96, "tiny images are scaled up for the gallery"


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
