"""The search API against a live app: Gradio endpoints through ``gradio_client`` and the JSON API under
``/api/v1`` through plain ``urllib``.

One ``python -m app`` subprocess serves the module (a 200-image collection, ``--auth alice:secret``,
``--max-upload 100kb`` so that the 413 cases stay small). Every answer is checked against the same search
run in this process on the same encoder and index (ids in order, scores to 1e-4), so a server that answers
wrongly, or not in the documented shape, fails.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

try:  # pytest's default "prepend" import mode puts tests/ itself on sys.path
    from server_helpers import free_port, stop_process, wait_until_serving
    from test_app import make_collection
except ImportError:  # e.g. --import-mode=importlib, or tests/ made a package
    from tests.server_helpers import free_port, stop_process, wait_until_serving
    from tests.test_app import make_collection

REPO = Path(__file__).resolve().parents[1]
USER, PASSWORD = "alice", "secret"
MAX_UPLOAD = 100_000  # --max-upload 100kb
RESULT_FIELDS = {"id", "key", "shard", "score", "label", "label_id", "caption", "thumbnail"}

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """``python -m app`` with a login and a small upload limit; yields url, encoder, index, log."""
    from export.runtime import Encoder
    from index.search import Index

    onnx_dir, index_dir = make_collection(tmp_path_factory)
    port = free_port()
    log = tmp_path_factory.mktemp("api-server") / "server.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1",
               GRADIO_TEMP_DIR=str(log.parent / "gradio-cache"), NO_PROXY="127.0.0.1,localhost",
               MANYVIEW_AUTH=f"{USER}:{PASSWORD}")
    command = [sys.executable, "-m", "app", "--encoder", str(onnx_dir), "--index", str(index_dir),
               "--host", "127.0.0.1", "--port", str(port), "--max-upload", "100kb", "--precision", "fp32"]
    with open(log, "wb") as log_handle:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_handle, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url + "/", process, log, 60.0)
        yield {"url": url, "encoder": Encoder(onnx_dir, precision="fp32"), "index": Index.load(index_dir), "log": log}
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def client(served: dict) -> Any:
    from gradio_client import Client

    return Client(served["url"] + "/", auth=(USER, PASSWORD), verbose=False, download_files=False)


def call(served: dict, method: str, path: str, body: Any = None, auth: tuple[str, str] | None = (USER, PASSWORD),
         raw: bytes | None = None) -> tuple[int, Any, dict]:
    """One HTTP request to the app: (status, JSON answer or bytes, headers)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(served["url"] + path, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, payload, headers = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        status, payload, headers = error.code, error.read(), dict(error.headers)
    if headers.get("content-type", headers.get("Content-Type", "")).startswith("application/json"):
        return status, json.loads(payload), headers
    return status, payload, headers


def expected_ids(served: dict, vector: np.ndarray, k: int, labels: tuple[str, ...] = ()) -> list[tuple[int, float]]:
    """What the app should answer, searched in this process (same encoder and index)."""
    from app.search import API_K_MAX, ResultFilter, search_vector

    hits = search_vector(served["index"], vector, k, ResultFilter.parse(list(labels), ""), with_images=False,
                         k_max=API_K_MAX)
    return [(hit.id, hit.score) for hit in hits]


def assert_same(results: list[dict], expected: list[tuple[int, float]]) -> None:
    assert [r["id"] for r in results] == [i for i, _ in expected]
    assert [r["score"] for r in results] == pytest.approx([s for _, s in expected], abs=1e-4)


def png_of(served: dict, sample_id: int) -> bytes:
    buffer = io.BytesIO()
    served["index"].image(sample_id).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------
# gradio_client
# ---------------------------------------------------------------------------------------------------


def test_gradio_client_needs_only_the_query(served: dict, client: Any) -> None:
    answer = client.predict("a photo of a ship", api_name="/search_text")
    results = answer["results"]
    assert answer["count"] == len(results) == 8
    vector = served["encoder"].encode_texts(["a photo of a ship"])[0]
    assert_same(results, expected_ids(served, vector, 8))
    record = served["index"].records([results[0]["id"]])[0]
    first = results[0]
    assert RESULT_FIELDS <= set(first)
    assert (first["key"], first["shard"], first["label"], first["label_id"], first["caption"]) == (
        record["key"], record["shard"], record["label_name"], record["label"], record["caption"])
    assert first["thumbnail"] == f"{served['url']}/api/v1/items/{first['id']}/thumbnail"
    status, picture, headers = call(served, "GET", first["thumbnail"][len(served["url"]):])
    assert status == 200 and headers["content-type"].startswith("image/")
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(io.BytesIO(picture)).convert("RGB")),
                          np.asarray(served["index"].image(first["id"])))


def test_gradio_client_image_id_and_options(served: dict, client: Any, tmp_path: Path) -> None:
    from gradio_client import handle_file

    sample_id = int(served["index"].ids[17])
    path = tmp_path / "query.png"
    path.write_bytes(png_of(served, sample_id))
    by_image = client.predict(handle_file(str(path)), api_name="/search_image")["results"]
    assert len(by_image) == 8 and by_image[0]["id"] == sample_id and by_image[0]["score"] == pytest.approx(1, abs=1e-4)
    by_id = client.predict(sample_id, api_name="/search_id")["results"]
    assert [r["id"] for r in by_id] == [r["id"] for r in by_image]
    label = by_image[3]["label"]
    filtered = client.predict("a photo of a ship", k=60, labels=[label], api_name="/search_text")["results"]
    vector = served["encoder"].encode_texts(["a photo of a ship"])[0]
    assert_same(filtered, expected_ids(served, vector, 60, (label,)))
    assert filtered and {r["label"] for r in filtered} == {label}
    assert len(client.predict("a dog", k=300, api_name="/search_text")["results"]) == 200  # the whole collection


@pytest.mark.parametrize("args, kwargs, message", [
    (("   ",), {"api_name": "/search_text"}, "Type a text query first"),
    ((999_999,), {"api_name": "/search_id"}, "Sample #999999 is not in the index"),
    (("a ship",), {"k": 5000, "api_name": "/search_text"}, "k must be a whole number from 1 to 1000"),
    (("a ship",), {"labels": ["unicorn"], "api_name": "/search_text"}, "Unknown label 'unicorn'"),
    (("a ship",), {"index": "nope", "api_name": "/search_text"}, "Unknown index 'nope'"),
])
def test_gradio_client_errors_raise_with_the_message(client: Any, args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(Exception, match=message):
        client.predict(*args, **kwargs)


def test_only_the_search_endpoints_are_public(client: Any) -> None:
    info = client.view_api(print_info=False, return_format="dict")
    assert set(info["named_endpoints"]) == {"/search_text", "/search_image", "/search_id"}
    assert not info["unnamed_endpoints"]
    for name, endpoint in info["named_endpoints"].items():
        required = [p["parameter_name"] for p in endpoint["parameters"] if not p["parameter_has_default"]]
        assert len(required) == 1, (name, required)
    with pytest.raises(Exception):
        client.predict(api_name="/draw")


# ---------------------------------------------------------------------------------------------------
# JSON API
# ---------------------------------------------------------------------------------------------------


def test_json_search_by_text_vector_image_and_id(served: dict) -> None:
    vector = served["encoder"].encode_texts(["a photo of a ship"])[0]
    status, answer, _ = call(served, "POST", "/api/v1/search", {"text": "a photo of a ship", "k": 10})
    assert status == 200 and answer["count"] == 10 and RESULT_FIELDS <= set(answer["results"][0])
    assert_same(answer["results"], expected_ids(served, vector, 10))
    status, by_vector, _ = call(served, "POST", "/api/v1/search", {"vector": (vector * 3).tolist(), "k": 10})
    assert status == 200 and [r["id"] for r in by_vector["results"]] == [r["id"] for r in answer["results"]]
    sample_id = int(served["index"].ids[5])
    encoded = base64.b64encode(png_of(served, sample_id)).decode()
    for body in ({"image_base64": encoded}, {"image_base64": "data:image/png;base64," + encoded}, {"id": sample_id}):
        status, found, _ = call(served, "POST", "/api/v1/search", body)
        assert status == 200 and found["results"][0]["id"] == sample_id and len(found["results"]) == 8, body


def test_json_k_up_to_1000_and_filters(served: dict) -> None:
    # k above the collection's 200 images: every image, best first (count says how many there were).
    status, answer, _ = call(served, "POST", "/api/v1/search", {"text": "a cat", "k": 1000})
    assert status == 200 and answer["count"] == 200 and len({r["id"] for r in answer["results"]}) == 200
    scores = [r["score"] for r in answer["results"]]
    assert scores == sorted(scores, reverse=True)
    label = answer["results"][-1]["label"]  # the label of the farthest image: a filter must look deep for it
    members = sum(1 for r in answer["results"] if r["label"] == label)
    status, filtered, _ = call(served, "POST", "/api/v1/search", {"text": "a cat", "k": 1000, "labels": [label]})
    assert status == 200 and filtered["count"] == members and {r["label"] for r in filtered["results"]} == {label}
    word = str(filtered["results"][0]["caption"]).split()[-1].strip(".").lower()
    status, worded, _ = call(served, "POST", "/api/v1/search", {"text": "a cat", "k": 5, "words": word})
    assert status == 200 and worded["count"] == 5
    assert all(word in r["caption"].lower() for r in worded["results"])
    status, too_many, _ = call(served, "POST", "/api/v1/search", {"text": "a cat", "k": 1001})
    assert status == 422 and "k: Input should be less than or equal to 1000" in too_many["error"]


def test_json_item_thumbnail_info_and_openapi(served: dict) -> None:
    sample_id = int(served["index"].ids[9])
    status, answer, _ = call(served, "GET", f"/api/v1/items/{sample_id}?k=4")
    record = served["index"].records([sample_id])[0]
    assert status == 200 and answer["item"]["id"] == sample_id and answer["item"]["key"] == record["key"]
    assert answer["item"]["thumbnail"].endswith(f"/api/v1/items/{sample_id}/thumbnail")
    assert len(answer["neighbours"]) == 4 and answer["neighbours"][0]["id"] == sample_id
    status, picture, headers = call(served, "GET", f"/api/v1/items/{sample_id}/thumbnail")
    assert status == 200 and headers["content-type"] in ("image/jpeg", "image/png") and len(picture) > 100
    status, info, _ = call(served, "GET", "/api/v1/info")
    assert status == 200 and info["count"] == 200 and info["dim"] == served["index"].dim and info["k_max"] == 1000
    status, document, _ = call(served, "GET", "/api/v1/openapi.json")
    assert status == 200 and {"/search", "/items/{item_id}", "/items/{item_id}/thumbnail"} <= set(document["paths"])
    assert "SearchRequest" in json.dumps(document["components"])
    status, page, _ = call(served, "GET", "/api/v1/docs")  # rendered here: nothing loaded from elsewhere
    text = page.decode("utf-8")
    assert status == 200 and "/api/v1/openapi.json" in text and "<script" not in text
    assert all(f"<code>{path}</code>" in text for path in document["paths"])
    assert "<code>image_base64</code>" in text and "&lt;= 1000" in text  # SearchRequest's fields and k's limit
    assert "curl -s -X POST" in text and "a photo of a ship" in text
    external = [link for link in re.findall(r"(?:src|href)='([^']+)'", text) if "://" in link
                and not link.startswith(text.split("Base URL <code>")[1].split("</code>")[0])]
    assert not external, external
    status, page, _ = call(served, "GET", "/api/v1/swagger")
    assert status == 200 and b"swagger" in page.lower() and b"/api/v1/openapi.json" in page


@pytest.mark.parametrize("body, status, message", [
    ({"vector": [0.1, 0.2, 0.3]}, 422, "vector has 3 numbers but this index holds 16-d embeddings"),
    ({"vector": [0.0] * 16}, 422, "all zeros"),
    ({"text": "a ship", "id": 3}, 422, "give exactly one of text, image_base64, id or vector (got text, id)"),
    ({}, 422, "give exactly one of"),
    ({"text": "  "}, 422, "Type a text query first"),
    ({"text": "a ship", "labels": ["unicorn"]}, 422, "Unknown label 'unicorn'"),
    ({"text": "a ship", "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
    ({"id": 999_999}, 404, "Sample #999999 is not in the index"),
    ({"image_base64": "not base64!"}, 422, "image_base64 is not valid base64"),
    ({"image_base64": base64.b64encode(b"plain text, not a picture").decode()}, 422, "not a readable image"),
    ({"image_base64": base64.b64encode(bytes(MAX_UPLOAD + 10)).decode()}, 413, "100,000-byte upload limit"),
    ({"image_base64": "A" * 300_000}, 413, "larger than this server accepts"),
])
def test_json_errors_have_a_status_and_a_message(served: dict, body: dict, status: int, message: str) -> None:
    got, answer, _ = call(served, "POST", "/api/v1/search", body)
    assert got == status and message in answer["error"], answer


def test_json_errors_for_bad_json_unknown_items_and_chunked_bodies(served: dict) -> None:
    status, answer, _ = call(served, "POST", "/api/v1/search", raw=b"{not json")
    assert status == 422 and "JSON decode error" in answer["error"]
    status, answer, _ = call(served, "GET", "/api/v1/items/999999")
    ids = served["index"].ids
    assert status == 404 and answer == {
        "error": f"Sample #999999 is not in the index (its ids lie between {ids.min()} and {ids.max()})."}
    assert call(served, "GET", "/api/v1/items/999999/thumbnail")[0] == 404
    # A body sent without Content-Length (chunked) is counted as it arrives.
    chunks = iter([b'{"image_base64": "', b"A" * 200_000, b"A" * 200_000, b'"}'])
    request = urllib.request.Request(served["url"] + "/api/v1/search", data=chunks, method="POST",
                                     headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked",
                                              "Authorization": "Basic " + base64.b64encode(b"alice:secret").decode()})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 413 and "larger than this server accepts" in json.loads(caught.value.read())["error"]


def test_json_api_needs_the_login(served: dict) -> None:
    for auth in (None, (USER, "wrong"), ("mallory", PASSWORD)):
        for method, path in (("POST", "/api/v1/search"), ("GET", "/api/v1/items/0/thumbnail"),
                             ("GET", "/api/v1/openapi.json"), ("GET", "/api/v1/docs"),
                             ("GET", "/api/v1/swagger")):
            status, answer, headers = call(served, method, path, {"text": "a ship"} if method == "POST" else None,
                                           auth=auth)
            assert status == 401 and "Log in" in answer["error"], (auth, path)
            assert headers["www-authenticate"] == 'Basic realm="manyview"'
    # The page's login cookie works as well (a logged-in browser may fetch thumbnail URLs).
    import http.cookiejar
    import urllib.parse

    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    form = urllib.parse.urlencode({"username": USER, "password": PASSWORD}).encode()
    with opener.open(served["url"] + "/login", data=form, timeout=10) as response:
        assert response.status == 200
    with opener.open(served["url"] + "/api/v1/info", timeout=10) as response:
        assert response.status == 200 and json.loads(response.read())["count"] == 200


# ---------------------------------------------------------------------------------------------------
# pieces, without a server
# ---------------------------------------------------------------------------------------------------


def test_one_search_thread_is_per_thread_and_restored() -> None:
    import threading

    import faiss

    from app.search import one_search_thread

    before = faiss.omp_get_max_threads()
    seen: list[int] = []
    with one_search_thread():
        assert faiss.omp_get_max_threads() == 1
        other = threading.Thread(target=lambda: seen.append(faiss.omp_get_max_threads()))
        other.start()
        other.join()
    assert faiss.omp_get_max_threads() == before and seen == [before]  # other threads keep every core


def test_candidate_limit_parse_k_vector_and_results() -> None:
    from app.api import parse_k, parse_vector, result_json, thumbnail_url
    from app.search import Hit, SearchError, candidate_limit

    assert candidate_limit(8, 60_000) == 2048 and candidate_limit(1000, 60_000) == 60_000
    assert candidate_limit(1000, 1_000_000) == 64_000 and candidate_limit(8, 100) == 100
    assert parse_k(None) == 8 and parse_k("12") == 12 and parse_k(1000.0) == 1000
    for bad in (0, 1001, 2.5, "many"):
        with pytest.raises(SearchError, match="k must be a whole number from 1 to 1000"):
            parse_k(bad)
    assert parse_vector([3.0, 4.0], 2) == pytest.approx([0.6, 0.8])
    with pytest.raises(SearchError, match="vector has an array of shape \\[2, 2\\] but this index holds 2-d"):
        parse_vector([[1.0, 2.0], [3.0, 4.0]], 2)
    with pytest.raises(SearchError, match="NaN or infinite"):
        parse_vector([float("nan"), 1.0], 2)
    record = {"id": 5, "key": "k5", "shard": "/d/s.tar", "label": -1, "label_name": "", "caption": "a cat",
              "split": "test", "blob": b"\x00"}
    assert result_json(Hit(id=5, score=0.5, record=record), "http://h:1/") == {
        "id": 5, "key": "k5", "shard": "/d/s.tar", "score": 0.5, "label": None, "label_id": None,
        "caption": "a cat", "thumbnail": "http://h:1/api/v1/items/5/thumbnail", "split": "test", "blob": None}
    assert thumbnail_url("", 7) == "/api/v1/items/7/thumbnail"
