"""The search API: structured results for programs, as Gradio endpoints and as plain JSON over HTTP.

Two faces, one code path (``run_query``):

* Gradio endpoints ``/search_text``, ``/search_image``, ``/search_id`` (``app.search_tab``), for
  ``gradio_client``: only the query is required;
* a JSON HTTP API under ``/api/v1`` (``build_api``, mounted on the app Gradio serves by ``app.ui.launch_app``)::

      POST /api/v1/search              {"text": "a ship", "k": 8}  (or "image_base64", "id", "vector";
                                        optional "labels", "words", "index")  -> {"results": [...]}
      GET  /api/v1/items/{id}?k=8      metadata, thumbnail URL and the k nearest neighbours
      GET  /api/v1/items/{id}/thumbnail   the image (as stored in the shard when it is a small web image)
      GET  /api/v1/info                 collection size, dimension, labels, limits
      GET  /api/v1/docs (a reference page that needs no internet), /api/v1/openapi.json,
           /api/v1/swagger (Swagger UI, loaded from a CDN)

Each result is ``{"id", "key", "shard", "score", "label", "label_id", "caption", "thumbnail"}``; the
thumbnail is a URL on this server, so answers carry no image data and a query costs its encode + search
only. Behind ``--auth`` the JSON API takes HTTP Basic with the same user:password pairs (or the login
cookie of the page). Errors answer ``{"error": message}`` with 401, 404 (unknown id), 413 (a body larger
than ``--max-upload`` allows), 422 (bad input: the message says what and how to fix it) or 500.
"""
# No ``from __future__ import annotations``: FastAPI reads the route annotations, which name classes made
# inside ``build_api``.
import base64
import binascii
import functools
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from app.search import (
    API_K_MAX, K_DEFAULT, K_MIN, Hit, ResultFilter, SearchError, UnknownSample, neighbours_for_id,
    neighbours_for_image, neighbours_for_text, sample_record, search_vector,
)

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
THUMBNAIL_ROUTE = API_PREFIX + "/items/{id}/thumbnail"
QUERY_KINDS = ("text", "image", "id", "vector")
STANDARD_FIELDS = ("id", "key", "shard", "label", "label_name", "caption")
WEB_IMAGE_MAGIC = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG": "image/png", b"RIFF": "image/webp", b"GIF8": "image/gif"}
PASS_THROUGH_BYTES = 64 << 10  # smaller web images are sent as stored; larger ones are scaled down first
JSON_BODY_SLACK = 64 << 10  # room for the JSON around a base64 image in a request body


class UploadTooLarge(SearchError):
    """A query image larger than the upload limit (the JSON API answers 413)."""


# ----------------------------------------------------------------------------------------------------
# queries and structured results (no web framework)
# ----------------------------------------------------------------------------------------------------


@dataclass
class ApiQuery:
    """One search: ``kind`` is text / image / id / vector and ``value`` the query itself (a string; an
    image as PIL, bytes or path; a sample id; a list of floats)."""

    kind: str
    value: Any
    k: Any = K_DEFAULT
    labels: Sequence[str] | str | None = ()
    words: str | None = ""
    index: str | None = None
    extra: dict = field(default_factory=dict)


def thumbnail_url(root_url: str, sample_id: int) -> str:
    """``{root}/api/v1/items/{id}/thumbnail``: where the result's picture can be fetched."""
    return root_url.rstrip("/") + THUMBNAIL_ROUTE.replace("{id}", str(int(sample_id)))


def _json_value(value: Any) -> Any:
    """A metadata value as JSON can hold it (NaN -> None, numpy scalars -> Python, bytes left out)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bytes, bytearray)):
        return None
    return value


def item_fields(record: dict, sample_id: int, root_url: str) -> dict:
    """The fields every answer gives for a sample: id, key, shard, label (the class name), label_id,
    caption, thumbnail URL, plus any further metadata columns under their own names."""
    label_id = _json_value(record.get("label"))
    fields = {
        "id": int(sample_id),
        "key": _json_value(record.get("key")),
        "shard": _json_value(record.get("shard")),
        "label": _json_value(record.get("label_name")) or None,
        "label_id": None if label_id is None or label_id == -1 else label_id,
        "caption": _json_value(record.get("caption")) or None,
        "thumbnail": thumbnail_url(root_url, sample_id),
    }
    for name, value in record.items():
        if name not in STANDARD_FIELDS and name not in fields:
            fields[name] = _json_value(value)
    return fields


def result_json(hit: Hit, root_url: str) -> dict:
    """One search result: ``item_fields`` plus its ``score`` (cosine similarity), right after ``shard``."""
    fields = item_fields(hit.record, hit.id, root_url)
    ordered = {name: fields[name] for name in ("id", "key", "shard")}
    ordered["score"] = float(hit.score)
    ordered.update((name, value) for name, value in fields.items() if name not in ordered)
    return ordered


def known_labels(collection: Any) -> frozenset[str]:
    """Every label name of the collection (computed once): a filter on any other label is a mistake."""
    def make() -> frozenset[str]:
        metadata = getattr(collection.index, "metadata", None)
        if metadata is None or "label_name" not in metadata.column_names:
            return frozenset()
        import pyarrow.compute as pc

        return frozenset(str(name) for name in pc.unique(metadata.column("label_name")).to_pylist() if name)

    return collection.cached("api-known-labels", make)


def parse_k(k: Any) -> int:
    """``k`` as an int in ``[1, API_K_MAX]``; ``SearchError`` (with the range) otherwise."""
    if k is None or k == "":
        return K_DEFAULT
    try:
        number = float(k)
    except (TypeError, ValueError) as error:
        raise SearchError(f"k must be a whole number from {K_MIN} to {API_K_MAX}, not {k!r}.") from error
    if not number.is_integer() or not K_MIN <= number <= API_K_MAX:
        raise SearchError(f"k must be a whole number from {K_MIN} to {API_K_MAX}, not {k!r}.")
    return int(number)


def parse_filter(collection: Any, labels: Any, words: Any) -> ResultFilter:
    """The result filter; ``SearchError`` naming the labels there are when one is unknown."""
    if labels is not None and not isinstance(labels, (str, list, tuple)):
        raise SearchError(f"labels must be a list of label names, not {type(labels).__name__}.")
    if words is not None and not isinstance(words, str):
        raise SearchError(f"words must be a string of caption words, not {type(words).__name__}.")
    result_filter = ResultFilter.parse(labels, words)
    known = known_labels(collection)
    unknown = [label for label in result_filter.labels if label not in known]
    if unknown:
        names = ", ".join(sorted(known)[:50]) if known else "none: this collection has no label names"
        raise SearchError(f"Unknown label {unknown[0]!r}; the labels are: {names}.")
    return result_filter


def choose_index(collection: Any, name: str | None) -> Any:
    """The index to search (``images`` by default, ``captions`` when served); ``SearchError`` otherwise."""
    if name in (None, ""):
        return collection.index
    if name not in collection.indexes:
        raise SearchError(f"Unknown index {name!r}; this app serves: {', '.join(collection.indexes)}.")
    return collection.indexes[name]


def parse_vector(value: Any, dim: int) -> np.ndarray:
    """A query embedding: ``dim`` finite numbers, not all zero, L2-normalised here (the index holds
    normalised embeddings, so scores are cosine similarities)."""
    try:
        vector = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise SearchError(f"vector must be a list of {dim} numbers.") from error
    if vector.ndim != 1 or vector.shape[0] != dim:
        got = f"{vector.shape[0]} numbers" if vector.ndim == 1 else f"an array of shape {list(vector.shape)}"
        raise SearchError(f"vector has {got} but this index holds {dim}-d embeddings: send a list of {dim} numbers.")
    if not np.all(np.isfinite(vector)):
        raise SearchError("vector holds NaN or infinite values.")
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        raise SearchError("vector is all zeros; it has no direction to search in.")
    return (vector / norm).astype(np.float32)


def decode_base64_image(text: Any, max_bytes: int) -> bytes:
    """The bytes of a base64 image (a ``data:image/...;base64,`` prefix is allowed); ``UploadTooLarge``
    above ``max_bytes``, ``SearchError`` for text that is not base64."""
    if not isinstance(text, str) or not text.strip():
        raise SearchError("image_base64 must be a non-empty base64 string of a JPEG, PNG or WebP file.")
    payload = text.strip()
    if payload.startswith("data:"):
        payload = payload.partition(",")[2]
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise UploadTooLarge(f"The image is larger than the {max_bytes:,}-byte upload limit (--max-upload).")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise SearchError(f"image_base64 is not valid base64 ({error}).") from error
    if len(data) > max_bytes:
        raise UploadTooLarge(f"The image is {len(data):,} bytes, above the {max_bytes:,}-byte upload limit "
                             "(--max-upload).")
    return data


def query_hits(collection: Any, query: ApiQuery) -> list[Hit]:
    """The hits of one query (no images read): validation first, every problem a ``SearchError``."""
    if query.kind not in QUERY_KINDS:
        raise SearchError(f"Unknown query kind {query.kind!r}; use one of {', '.join(QUERY_KINDS)}.")
    k = parse_k(query.k)
    result_filter = parse_filter(collection, query.labels, query.words)
    index = choose_index(collection, query.index)
    encoder = collection.encoder
    options = {"result_filter": result_filter, "with_images": False, "k_max": API_K_MAX}
    if query.kind == "text":
        if not isinstance(query.value, str):
            raise SearchError("text must be a string.")
        return neighbours_for_text(encoder, index, query.value, k, **options)
    if query.kind == "image":
        return neighbours_for_image(encoder, index, query.value, k, **options)
    if query.kind == "id":
        if isinstance(query.value, bool) or (isinstance(query.value, float) and not query.value.is_integer()):
            raise SearchError(f"A sample id is a whole number, not {query.value!r}.")
        return neighbours_for_id(encoder, index, query.value, k, thumbs=collection.thumbs, source=collection.index,
                                 **options)
    vector = parse_vector(query.value, index.dim)
    return search_vector(index, vector, k, result_filter, with_images=False, k_max=API_K_MAX)


def run_query(collection: Any, query: ApiQuery, root_url: str) -> dict:
    """``{"results": [...], "count": n, "elapsed_ms": t}`` for one query (``SearchError`` for bad input)."""
    start = time.perf_counter()
    hits = query_hits(collection, query)
    results = [result_json(hit, root_url) for hit in hits]
    return {"results": results, "count": len(results), "elapsed_ms": round((time.perf_counter() - start) * 1000, 2)}


def item_answer(collection: Any, sample_id: Any, k: Any, root_url: str) -> dict:
    """``{"item": {...}, "neighbours": [...]}``: a sample's fields and its ``k`` nearest ("more like this",
    itself first); ``k`` = 0 skips the neighbours."""
    if isinstance(sample_id, bool) or (isinstance(sample_id, float) and not sample_id.is_integer()):
        raise SearchError(f"A sample id is a whole number, not {sample_id!r}.")
    record = sample_record(collection.index, sample_id)
    number = int(record.get("id", sample_id))
    answer: dict = {"item": item_fields(record, number, root_url), "neighbours": []}
    if k not in (0, "0"):
        hits = query_hits(collection, ApiQuery("id", number, k))
        answer["neighbours"] = [result_json(hit, root_url) for hit in hits]
    return answer


def thumbnail_bytes(collection: Any, sample_id: Any) -> tuple[bytes, str]:
    """A sample's picture and its media type: the shard's bytes when they are a small JPEG/PNG/WebP/GIF
    (no decoding at all), else a PNG of ``app.thumbnails.thumbnail`` (at most 256 px a side)."""
    import io

    from app.thumbnails import thumbnail
    from trainer.data.shards import decode_image

    record = sample_record(collection.index, sample_id)
    try:
        data = collection.thumbs.encoded([record])[0]
    except (KeyError, OSError) as error:
        raise SearchError(f"Sample #{sample_id} cannot be read from its shard ({error}).") from error
    media = next((kind for magic, kind in WEB_IMAGE_MAGIC.items() if data.startswith(magic)), None)
    if media is not None and len(data) <= PASS_THROUGH_BYTES and (media != "image/webp" or data[8:12] == b"WEBP"):
        return data, media
    try:
        picture = thumbnail(decode_image(data))
    except ValueError as error:
        raise SearchError(f"Sample #{sample_id} has an unreadable image in its shard ({error}).") from error
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"


def error_status(error: Exception) -> int:
    """The HTTP status of an error raised by a query: 404 unknown id, 413 too large, 422 other bad input."""
    if isinstance(error, UnknownSample):
        return 404
    if isinstance(error, UploadTooLarge):
        return 413
    if isinstance(error, SearchError):
        return 422
    return 500


# ----------------------------------------------------------------------------------------------------
# the FastAPI application mounted under /api/v1
# ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def api_models() -> tuple[Any, Any, Any]:
    """The pydantic models of the JSON API (request, search answer, item answer), built on first use so
    that importing this module stays cheap."""
    from pydantic import BaseModel, ConfigDict, Field, model_validator

    class Result(BaseModel):
        id: int = Field(description="the sample id (index.json's ids)")
        key: str | None = Field(None, description="the WebDataset key in its shard")
        shard: str | None = Field(None, description="the shard file holding the sample")
        score: float = Field(description="cosine similarity to the query")
        label: str | None = Field(None, description="the class name")
        label_id: int | None = Field(None, description="the class number")
        caption: str | None = None
        thumbnail: str = Field(description="URL of the sample's picture on this server")
        model_config = ConfigDict(extra="allow")

    class Item(BaseModel):
        id: int
        key: str | None = None
        shard: str | None = None
        label: str | None = None
        label_id: int | None = None
        caption: str | None = None
        thumbnail: str
        model_config = ConfigDict(extra="allow")

    class SearchRequest(BaseModel):
        """Exactly one of text, image_base64, id or vector, plus k and the optional filters."""

        model_config = ConfigDict(extra="forbid",
                                  json_schema_extra={"examples": [{"text": "a photo of a ship", "k": 8}]})
        text: str | None = Field(None, description="a text query (image-text encoders only)")
        image_base64: str | None = Field(None, description="a JPEG/PNG/WebP file in base64 (a data: URL is fine)")
        id: int | None = Field(None, description="an indexed sample: more like it")
        vector: list[float] | None = Field(None, description="an embedding of the index's dimension (GET /info)")
        k: int = Field(K_DEFAULT, ge=K_MIN, le=API_K_MAX, description="how many results")
        labels: list[str] = Field(default_factory=list, description="keep results with one of these label names")
        words: str = Field("", description="keep results whose caption holds every one of these words")
        index: str | None = Field(None, description="which index to search: images (default) or captions")

        @model_validator(mode="after")
        def one_query(self) -> "SearchRequest":
            given = [name for name in ("text", "image_base64", "id", "vector") if getattr(self, name) is not None]
            if len(given) != 1:
                raise ValueError("give exactly one of text, image_base64, id or vector"
                                 + (f" (got {', '.join(given)})" if given else ""))
            return self

        def query(self) -> tuple[str, Any]:
            """(kind, value) of the one query given."""
            for name, kind in (("text", "text"), ("image_base64", "image"), ("id", "id"), ("vector", "vector")):
                if getattr(self, name) is not None:
                    return kind, getattr(self, name)
            raise SearchError("give exactly one of text, image_base64, id or vector")

    class SearchAnswer(BaseModel):
        results: list[Result]
        count: int = Field(description="len(results): k, or fewer when the collection or the filter has fewer")
        elapsed_ms: float = Field(description="the server's time for the query (encode + search)")

    class ItemAnswer(BaseModel):
        item: Item
        neighbours: list[Result]

    return SearchRequest, SearchAnswer, ItemAnswer


def check_basic(pairs: Sequence[tuple[str, str]], user: str, password: str) -> bool:
    """Whether ``user``/``password`` is one of ``pairs`` (constant-time comparisons, every pair tried)."""
    found = False
    for expected_user, expected_password in pairs:
        same_user = secrets.compare_digest(user.encode(), expected_user.encode())
        same_password = secrets.compare_digest(password.encode(), expected_password.encode())
        found |= same_user and same_password
    return found


class BodyLimit:
    """ASGI middleware: refuse request bodies above ``max_bytes`` with 413, by their Content-Length before
    reading them and by counting when they come chunked."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from fastapi import HTTPException

        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_json(send, 413, {"error": self._message(int(length))})
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self._message(seen))
            return message

        await self.app(scope, counted, send)

    def _message(self, size: int) -> str:
        return (f"The request body ({size:,} bytes or more) is larger than this server accepts "
                f"({self.max_bytes:,} bytes: --max-upload plus base64's third).")


async def _send_json(send: Callable, status: int, body: dict) -> None:
    import json

    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _validation_message(errors: Sequence[dict]) -> str:
    """Pydantic's errors as one line, e.g. ``k: Input should be less than or equal to 1000``."""
    parts = []
    for error in errors:
        location = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path"))
        message = str(error.get("msg", "invalid"))
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts) or "invalid request"


def build_api(collection: Any, auth: Sequence[tuple[str, str]] | None = None, max_upload: int = 25_000_000,
              session_user: Callable[[Any], str | None] | None = None) -> Any:
    """The ``/api/v1`` FastAPI application for ``collection`` (mount it with ``mount_api``).

    ``auth``: user:password pairs; when given every route (the docs too) needs HTTP Basic with one of them,
    or a page login cookie that ``session_user(request)`` recognises. ``max_upload``: the largest image in
    bytes (the body may be base64's third larger).
    """
    from fastapi import Depends, FastAPI, HTTPException, Query, Request
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from fastapi.security import HTTPBasic, HTTPBasicCredentials
    from starlette.exceptions import HTTPException as StarletteHTTPException

    SearchRequest, SearchAnswer, ItemAnswer = api_models()

    pairs = list(auth or [])
    basic = HTTPBasic(auto_error=False, realm="manyview", description="the --auth user:password pairs")

    def authorise(request: Request, credentials: HTTPBasicCredentials | None = Depends(basic)) -> str | None:
        if not pairs:
            return None
        if credentials is not None and check_basic(pairs, credentials.username, credentials.password):
            return credentials.username
        user = session_user(request) if session_user is not None else None
        if user:
            return str(user)
        raise HTTPException(401, "Log in: HTTP Basic with one of the --auth user:password pairs.",
                            headers={"WWW-Authenticate": 'Basic realm="manyview"'})

    api = FastAPI(title="manyview search API", version="1",
                  description="Search the served image collection by text, image, sample id or embedding.",
                  docs_url=None, redoc_url=None, openapi_url=None, dependencies=[Depends(authorise)])
    api.add_middleware(BodyLimit, max_bytes=int(max_upload) * 4 // 3 + JSON_BODY_SLACK)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(error.errors(), custom_encoder={Exception: str})
        return JSONResponse({"error": _validation_message(errors), "detail": errors}, status_code=422)

    def fail(error: Exception) -> HTTPException:
        status = error_status(error)
        if status == 500:
            logger.exception("API request failed")
            return HTTPException(500, f"Search failed ({type(error).__name__}): {error}")
        return HTTPException(status, str(error))

    def root_url(request: Request) -> str:
        """The app's root URL as the client reached it (the mount path stripped)."""
        base = str(request.base_url).rstrip("/")
        return base[: -len(API_PREFIX)] if base.endswith(API_PREFIX) else base

    @api.get("/openapi.json", include_in_schema=False)
    def openapi_document() -> JSONResponse:
        return JSONResponse(api.openapi())

    @api.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        from app.api_docs import render

        return HTMLResponse(render(api.openapi(), root_url(request) + API_PREFIX))  # self-contained: works offline

    @api.get("/swagger", include_in_schema=False)
    def swagger(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=root_url(request) + API_PREFIX + "/openapi.json",
                                   title="manyview search API")  # loads Swagger UI from a CDN

    @api.get("/info", summary="What is served: collection size, embedding dimension, labels, limits")
    def info() -> dict:
        index = collection.index
        return {"count": int(index.count), "dim": int(index.dim), "text_search": bool(collection.encoder.has_text),
                "indexes": list(collection.indexes), "labels": sorted(known_labels(collection)),
                "k_default": K_DEFAULT, "k_max": API_K_MAX, "max_upload_bytes": int(max_upload)}

    @api.post("/search", response_model=SearchAnswer, summary="Nearest samples to a text, image, sample or vector",
              responses={404: {"description": "unknown sample id"}, 413: {"description": "image too large"},
                         422: {"description": "bad input, e.g. a vector of the wrong dimension"}})
    def search(body: SearchRequest, request: Request) -> dict:
        kind, value = body.query()
        if kind == "image":
            try:
                value = decode_base64_image(value, int(max_upload))
            except SearchError as error:
                raise fail(error) from error
        query = ApiQuery(kind, value, body.k, body.labels, body.words, body.index)
        try:
            return run_query(collection, query, root_url(request))
        except Exception as error:  # noqa: BLE001 - every failure becomes a JSON error with its status
            raise fail(error) from error

    @api.get("/items/{item_id}", response_model=ItemAnswer, summary="A sample's metadata, thumbnail URL and neighbours",
             responses={404: {"description": "unknown sample id"}})
    def item(item_id: int, request: Request,
             k: int = Query(K_DEFAULT, ge=0, le=API_K_MAX, description="neighbours to list (0: none)")) -> dict:
        try:
            return item_answer(collection, item_id, k, root_url(request))
        except Exception as error:  # noqa: BLE001
            raise fail(error) from error

    @api.get("/items/{item_id}/thumbnail", summary="A sample's picture", response_class=Response,
             responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}, 404: {"description": "unknown id"}})
    def item_thumbnail(item_id: int) -> Response:
        try:
            data, media = thumbnail_bytes(collection, item_id)
        except Exception as error:  # noqa: BLE001
            raise fail(error) from error
        return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=3600"})

    return api


def mount_api(app: Any, api: Any) -> None:
    """Serve ``api`` under ``/api/v1`` of ``app`` (the FastAPI app Gradio runs), ahead of Gradio's own routes."""
    from starlette.routing import Mount

    app.router.routes.insert(0, Mount(API_PREFIX, app=api, name="manyview-api"))
