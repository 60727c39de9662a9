"""Search API under load: p50 / p99 of text queries at 1 and 16 concurrent clients, JSON API vs gradio_client.

    python tests/benchmarks/bench_api_load.py [--workdir DIR] [--seconds 60] [--clients 1,16] [--output FILE]
    pytest tests/benchmarks/bench_api_load.py -m benchmark -s     # the same, as an on-demand test

The collection is bench_app_latency.py's: all 60,000 CIFAR-10 images indexed with a small clip model,
built once and cached in ``--workdir`` (default ``$TMPDIR/manyview-bench-app``). The app runs as
``python -m app`` in a subprocess on 127.0.0.1, as a user starts it.

Two client kinds, side by side: *json* (``POST /api/v1/search {"text": ..., "k": 8}`` over one kept-alive
``http.client`` connection per client) and *gradio_client* (``Client.predict(text, api_name="/search_text")``,
``download_files=False``). Each client is its own process (no GIL shared between clients) that sends
queries back to back until its time is up. Every (kind, concurrency) cell gets ``--seconds`` in all, run as
``--rounds`` interleaved slices (json, gradio_client, json, ...) so that a change in the machine's load
hits both kinds alike. The queries cycle through 1,000 distinct prompts.

A request fails when it raises, answers another status than 200, or does not hold exactly k results; the
first answer to each prompt per kind is also checked against ``app.search.search_vector`` in this process
(same encoder and index: the same ids in the same order). A latency from a server that fails or answers
wrongly is not a figure: ``test_api_load`` asserts zero of both.

Before the load, ``where_time_goes`` times the steps of one JSON text query in this process (tokenise +
ONNX text encoder, FAISS search, metadata, building the answer) and over HTTP, one query at a time.
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
for path in (ROOT, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_app_latency import CLASSES, DEFAULT_DATA, cpu_model, percentile, prepare  # noqa: E402

TARGET_P50_MS = 50.0
K = 8
ADJECTIVES = ["", "small ", "big ", "blurry ", "dark ", "bright ", "old ", "red ", "white ", "wet "]
TEMPLATES = ["a photo of a {}{}.", "a {}{} in the wild", "my {}{}", "a close-up of a {}{}", "a picture of the {}{}",
             "a cropped photo of a {}{}", "a {}{} at night", "a drawing of a {}{}", "a pixelated {}{}", "the {}{}"]

try:
    import pytest
except ImportError:  # run as a script without pytest
    pytest = None


def prompts(count: int = 1000) -> list[str]:
    """``count`` distinct text queries (template x adjective x class)."""
    found = [template.format(adjective, name) for template in TEMPLATES for adjective in ADJECTIVES for name in CLASSES]
    return found[:count]


# ---------------------------------------------------------------------------------------------------
# clients (each runs in its own process)
# ---------------------------------------------------------------------------------------------------


class JsonClient:
    """``POST /api/v1/search`` over one kept-alive connection."""

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        self.host, self.port = parsed.hostname, parsed.port
        self.connection = http.client.HTTPConnection(self.host, self.port, timeout=60)

    def search(self, text: str) -> list[int]:
        body = json.dumps({"text": text, "k": K})
        try:
            self.connection.request("POST", "/api/v1/search", body=body, headers={"Content-Type": "application/json"})
            response = self.connection.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException):
            self.connection.close()
            self.connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
            raise
        if response.status != 200:
            raise RuntimeError(f"status {response.status}: {payload[:200]!r}")
        return [result["id"] for result in json.loads(payload)["results"]]


class GradioClient:
    """``gradio_client.Client.predict(text, api_name="/search_text")``: only the query."""

    def __init__(self, url: str) -> None:
        from gradio_client import Client

        self.client = Client(url, verbose=False, download_files=False)

    def search(self, text: str) -> list[int]:
        return [result["id"] for result in self.client.predict(text, api_name="/search_text")["results"]]


def client_loop(kind: str, url: str, queries: list[str], offset: int, ready: Any, go: Any, window: Any,
                out: Any) -> None:
    """Connect, say ``ready``, wait for ``go``, then send queries back to back inside ``window`` (start, stop
    as epoch seconds); put (latencies ms, failures, first answer per prompt) on ``out``."""
    try:
        client = JsonClient(url) if kind == "json" else GradioClient(url)
        client.search(queries[offset % len(queries)])  # connect (and for gradio_client read the config) first
    except Exception as error:  # noqa: BLE001 - reported as a failure
        ready.put(False)
        out.put(([], [f"client start: {type(error).__name__}: {error}"], {}))
        return
    ready.put(True)
    go.wait()
    start_at, stop_at = window[0], window[1]
    latencies: list[float] = []
    failures: list[str] = []
    answers: dict[str, list[int]] = {}
    while time.time() < start_at:
        time.sleep(0.001)
    number = offset
    while time.time() < stop_at:
        text = queries[number % len(queries)]
        number += 1
        began = time.perf_counter()
        try:
            ids = client.search(text)
        except Exception as error:  # noqa: BLE001 - every failure is counted and reported
            failures.append(f"{type(error).__name__}: {str(error)[:200]}")
            continue
        latencies.append((time.perf_counter() - began) * 1000)
        if len(ids) != K:
            failures.append(f"{len(ids)} results for {text!r}, expected {K}")
        answers.setdefault(text, ids)
    out.put((latencies, failures, answers))


def run_slice(kind: str, url: str, clients: int, seconds: float, queries: list[str]) -> dict:
    """``clients`` processes of ``kind`` for ``seconds`` (timed from when all of them have connected); their
    latencies, failures and first answers."""
    context = multiprocessing.get_context("spawn")
    out, ready, go = context.Queue(), context.Queue(), context.Event()
    window = context.Array("d", [0.0, 0.0])
    processes = [context.Process(target=client_loop, args=(kind, url, queries, number * 61, ready, go, window, out),
                                 daemon=True) for number in range(clients)]
    for process in processes:
        process.start()
    for _ in processes:
        ready.get(timeout=600)  # every client has connected (or failed to)
    window[0] = time.time() + 0.5
    window[1] = window[0] + seconds
    go.set()
    parts = [out.get(timeout=seconds + 120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    latencies = [value for part in parts for value in part[0]]
    failures = [value for part in parts for value in part[1]]
    answers: dict = {}
    for part in parts:
        for text, ids in part[2].items():
            answers.setdefault(text, ids)
    return {"latencies": latencies, "failures": failures, "answers": answers, "seconds": seconds}


# ---------------------------------------------------------------------------------------------------
# where the time goes (one query at a time)
# ---------------------------------------------------------------------------------------------------


def where_time_goes(encoder_dir: Path, index_dir: Path, url: str, queries: list[str], repeats: int = 200) -> dict:
    """(median, 90th percentile) ms of each step of a JSON text query, in this process and over HTTP; the
    FAISS search both with faiss's default OpenMP threads and with one (``app.search.one_search_thread``,
    what the app does)."""
    from app.api import result_json
    from app.search import Hit, one_search_thread
    from export.runtime import Encoder
    from index.search import Index

    encoder, index = Encoder(encoder_dir), Index.load(index_dir)
    names = ["tokenise + text encoder", "faiss search (k=8), default OpenMP threads",
             "faiss search (k=8), one OpenMP thread (the app)", "metadata (8 records)", "answer JSON",
             "HTTP round trip (JSON API, whole query)"]
    steps: dict[str, list[float]] = {name: [] for name in names}
    client = JsonClient(url)
    # The round trips first, on their own: faiss's OpenMP threads in this process keep spinning for a while
    # after each multi-threaded search and would take the cores from the server.
    for number in range(repeats + 10):
        began = time.perf_counter()
        client.search(queries[(number * 7) % len(queries)])
        if number >= 10:
            steps[names[-1]].append((time.perf_counter() - began) * 1000)
    for number in range(repeats + 10):
        text = queries[(number * 7) % len(queries)]
        times = [time.perf_counter()]
        vector = encoder.encode_texts([text])[0]
        times.append(time.perf_counter())
        index.search(vector[None, :], K)
        times.append(time.perf_counter())
        with one_search_thread():
            scores, ids = index.search(vector[None, :], K)
        times.append(time.perf_counter())
        records = index.records(ids[0])
        times.append(time.perf_counter())
        hits = [Hit(id=int(i), score=float(s), record=r) for i, s, r in zip(ids[0], scores[0], records)]
        json.dumps({"results": [result_json(hit, url) for hit in hits]})
        times.append(time.perf_counter())
        if number >= 10:  # warm-up excluded
            for name, began, ended in zip(names[:-1], times, times[1:]):
                steps[name].append((ended - began) * 1000)
    return {name: (percentile(values, 0.5), percentile(values, 0.9)) for name, values in steps.items()}


def expected_ids(encoder_dir: Path, index_dir: Path, texts: list[str]) -> dict[str, list[int]]:
    from app.search import search_vector
    from export.runtime import Encoder
    from index.search import Index

    encoder, index = Encoder(encoder_dir), Index.load(index_dir)
    vectors = encoder.encode_texts(texts)
    return {text: [hit.id for hit in search_vector(index, vector, K, with_images=False)]
            for text, vector in zip(texts, vectors)}


# ---------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------


def run(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "manyview-bench-app"))
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--seconds", type=float, default=60.0, help="per client kind and concurrency, in all")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved slices the seconds are split into")
    parser.add_argument("--clients", default="1,16", help="concurrency levels")
    parser.add_argument("--output", default=None, help="append the Markdown report to this file")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    encoder, index = prepare(workdir, Path(args.data))
    from screenshots import start_app, stop

    queries = prompts()
    levels = [int(level) for level in args.clients.split(",")]
    kinds = ("json", "gradio_client")
    with tempfile.TemporaryDirectory(prefix="manyview-bench-api-") as scratch_name:
        scratch = Path(scratch_name)
        os.environ["GRADIO_TEMP_DIR"] = str(scratch / "gradio")
        process, url = start_app(["--encoder", str(encoder), "--index", str(index)], scratch / "app.log")
        try:
            time.sleep(float(os.environ.get("BENCH_APP_SETTLE_S", "15")))  # the app's shard warm-up
            steps = where_time_goes(encoder, index, url, queries)
            cells: dict = {(kind, level): {"latencies": [], "failures": [], "answers": {}, "seconds": 0.0}
                           for level in levels for kind in kinds}
            for level in levels:
                for _ in range(args.rounds):
                    for kind in kinds:
                        part = run_slice(kind, url, level, args.seconds / args.rounds, queries)
                        cell = cells[(kind, level)]
                        cell["latencies"] += part["latencies"]
                        cell["failures"] += part["failures"]
                        cell["seconds"] += part["seconds"]
                        for text, ids in part["answers"].items():
                            cell["answers"].setdefault(text, ids)
        finally:
            stop(process)
            log_tail = (scratch / "app.log").read_text(errors="replace")[-2000:]
    answered = sorted({text for cell in cells.values() for text in cell["answers"]})
    expected = expected_ids(encoder, index, answered)
    rows = []
    for (kind, level), cell in cells.items():
        wrong = [text for text, ids in cell["answers"].items() if ids != expected[text]]
        values = cell["latencies"]
        rows.append({"kind": kind, "clients": level, "requests": len(values), "failed": len(cell["failures"]),
                     "wrong": len(wrong), "checked": len(cell["answers"]), "seconds": cell["seconds"],
                     "p50_ms": percentile(values, 0.5) if values else None,
                     "p99_ms": percentile(values, 0.99) if values else None,
                     "per_s": len(values) / cell["seconds"] if cell["seconds"] else 0.0,
                     "first_failures": cell["failures"][:3], "first_wrong": wrong[:3]})
    import gradio
    import onnxruntime

    from index.search import Index

    info = Index.load(index).info
    result = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load": os.getloadavg(),
                    "python": platform.python_version(), "gradio": gradio.__version__,
                    "onnxruntime": onnxruntime.__version__},
        "index": {"factory": info.get("factory"), "count": info.get("count"), "dim": info.get("dim"),
                  "search_params": info.get("search_params")},
        "steps": steps, "rows": rows, "args": vars(args),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "log_tail": log_tail,
    }
    result["markdown"] = markdown(result)
    print(result["markdown"])
    if args.output:
        with open(args.output, "a", encoding="utf-8") as handle:
            handle.write("\n" + result["markdown"])
    return result


def markdown(result: dict) -> str:
    machine, index, args = result["machine"], result["index"], result["args"]
    lines = [
        "## Search API under load (tests/benchmarks/bench_api_load.py)",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores shared by the server and every client process "
        f"(load average at the end {', '.join(f'{x:.1f}' for x in machine['load'])}), no GPU; Python "
        f"{machine['python']}, gradio {machine['gradio']}, onnxruntime {machine['onnxruntime']}. {result['date']}.",
        "",
        f"Collection: all {index['count']:,} CIFAR-10 images, {index['dim']}-d embeddings of bench_app_latency.py's "
        f"clip cnn-small model, index `{index['factory']}` {index['search_params'] or ''}.",
        "",
        f"Text queries, k = {K}, 1,000 distinct prompts, each client a process sending queries back to back; "
        f"{args['seconds']:.0f} s per cell in {args['rounds']} interleaved slices. *json*: `POST /api/v1/search` "
        "(one kept-alive connection per client); *gradio_client*: `Client.predict(text, api_name=\"/search_text\")`. "
        "A failure is an exception, a status other than 200 or not k results; *wrong*: first answers to a prompt "
        "whose ids differ from `app.search.search_vector` in the benchmark process.",
        "",
        "| client | concurrent clients | requests | requests/s | p50 (ms) | p99 (ms) | failed | wrong / checked |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(result["rows"], key=lambda r: (r["clients"], r["kind"] != "json")):
        p50 = f"{row['p50_ms']:.1f}" if row["p50_ms"] is not None else "n/a"
        p99 = f"{row['p99_ms']:.1f}" if row["p99_ms"] is not None else "n/a"
        lines.append(f"| {row['kind']} | {row['clients']} | {row['requests']:,} | {row['per_s']:.1f} | {p50} | {p99} | "
                     f"{row['failed']} | {row['wrong']} / {row['checked']} |")
    single = next((row for row in result["rows"] if row["kind"] == "json" and row["clients"] == 1), None)
    if single and single["p50_ms"] is not None:
        verdict = "met" if single["p50_ms"] <= TARGET_P50_MS else "missed"
        lines += ["", f"Target p50 <= {TARGET_P50_MS:.0f} ms for a text query through the JSON API (1 client): "
                      f"{verdict} ({single['p50_ms']:.1f} ms)."]
    lines += ["", "Where the time of one JSON text query goes (200 queries, one at a time, before the load; the "
                  "steps in the benchmark process on the same encoder and index, the round trip against the app):",
              "", "| step | p50 (ms) | p90 (ms) |", "|---|---|---|"]
    lines += [f"| {name} | {p50:.2f} | {p90:.2f} |" for name, (p50, p90) in result["steps"].items()]
    return "\n".join(lines) + "\n"


if pytest is not None:
    @pytest.mark.benchmark
    def test_api_load() -> None:
        if not (DEFAULT_DATA / "test-000000.tar.gz").exists():
            pytest.skip(f"CIFAR-10 shards not found at {DEFAULT_DATA}")
        argv = ["--seconds", os.environ.get("BENCH_API_SECONDS", "60")]
        if os.environ.get("BENCH_APP_WORKDIR"):
            argv += ["--workdir", os.environ["BENCH_APP_WORKDIR"]]
        if os.environ.get("BENCH_OUTPUT"):
            argv += ["--output", os.environ["BENCH_OUTPUT"]]
        result = run(argv)
        for row in result["rows"]:
            assert row["requests"] > 0, row
            assert row["failed"] == 0, row
            assert row["wrong"] == 0, row


if __name__ == "__main__":
    run()
