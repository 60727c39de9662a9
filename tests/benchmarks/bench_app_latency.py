"""App latency: p50/p95 of text -> image and image -> image queries through ``gradio_client``, end to end.

    python tests/benchmarks/bench_app_latency.py [--workdir DIR] [--queries 100] [--output FILE.md]
    pytest tests/benchmarks/bench_app_latency.py -m benchmark -s     # the same, as an on-demand test

The collection is all 60,000 CIFAR-10 images (``../shared/data/cifar10``, train + test shards) indexed
with a small image-text model trained here once (``clip``, cnn-small, 150 steps of batch 64: the
model's quality does not change the latency) and cached in ``--workdir`` (default
``$TMPDIR/manyview-bench-app``): ``run/`` (model, ONNX), ``index/``. The app runs as ``python -m app``
in a subprocess on 127.0.0.1, exactly as a user starts it; the client sits in this process.

A query is one call of the search API (``app.api``): ``/search_text`` with a prompt or ``/search_image``
with a CIFAR test image, k = 8, only the query and k given, timed from the call to the parsed answer
(``{"results": [...]}`` with thumbnail URLs, no image data). Three client modes: ``api``
(``gradio_client`` ``Client.predict``), ``rest`` (Gradio's REST API with httpx: upload, ``POST
/gradio_api/call/<api>``, read the event stream) and ``json`` (the plain JSON API, ``POST /api/v1/search``
with ``text`` or ``image_base64``). The server-side share is the answer's ``elapsed_ms`` (encode + search
+ metadata). Queries run one at a time, after 5 warm-up queries per kind. For many clients at once see
``bench_api_load.py``.

Every timed answer is also checked (``check_answers``): it must hold the k results with the same labels
and scores (to 2e-3) as ``app.search.search_vector`` gives in this process for the same query on the same
encoder and index, and every repeat of a query must give the same answer. A latency from a server that
answers wrongly is not a figure.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10"
TARGET_P50_MS = 100.0
MODES = ("api", "rest", "json")
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}", "a {} in the wild", "a small {}", "my {}"]

try:
    import pytest
except ImportError:  # run as a script without pytest
    pytest = None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def prepare(workdir: Path, data: Path) -> tuple[Path, Path]:
    """Train (150 steps), export and index all of CIFAR-10 once; reuse what ``workdir`` already holds."""
    run, index = workdir / "run", workdir / "index"
    python = sys.executable
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    if not (run / "model" / "config.json").exists():
        subprocess.run([python, "trainer/pretrain.py", "--objective", "clip", "--train-data",
                        f"{data}/train-{{000000..000009}}.tar.gz", "--output", str(run), "--backbone", "cnn-small",
                        "--batch-size", "64", "--max-steps", "150", "--lr", "2e-3",
                        "--set", "text={width: 128, heads: 4, layers: 2, context_length: 16}"],
                       cwd=ROOT, env=env, check=True)
    if not (run / "onnx" / "preprocess.json").exists():
        subprocess.run([python, "-m", "export", "--model", str(run / "model"), "--output", str(run / "onnx")],
                       cwd=ROOT, env=env, check=True)
    if not (index / "index.json").exists():
        subprocess.run([python, "-m", "index.build", "--encoder", str(run / "onnx"), "--data",
                        f"{data}/train-*.tar.gz::{data}/test-*.tar.gz", "--output", str(index), "--no-progress"],
                       cwd=ROOT, env=env, check=True)
    return run / "onnx", index


def query_images(data: Path, folder: Path, count: int) -> list[str]:
    """``count`` CIFAR-10 test images saved as PNG files (what a user would upload)."""
    from trainer.data.shards import decode_image, iter_shard

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for sample in iter_shard(str(data / "test-000001.tar.gz")):
        path = folder / f"{len(paths):03d}.png"
        decode_image(sample.image).save(path)
        paths.append(str(path))
        if len(paths) == count:
            break
    return paths


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = int(position), min(int(position) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class RestClient:
    """Gradio's documented REST API (what ``curl`` or a JavaScript client does): upload a file, POST
    ``/gradio_api/call/<api>``, read the answer from its event stream. No polling interval."""

    def __init__(self, url: str) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=60)

    def upload(self, path: str) -> dict:
        with open(path, "rb") as handle:
            files = [("files", (Path(path).name, handle, "image/png"))]
            response = self.http.post(f"{self.url}/gradio_api/upload", files=files)
        response.raise_for_status()
        return {"path": response.json()[0], "meta": {"_type": "gradio.FileData"}}

    def predict(self, *args: object, api_name: str) -> list:
        data = [self.upload(arg.path) if isinstance(arg, LocalFile) else arg for arg in args]
        response = self.http.post(f"{self.url}/gradio_api/call{api_name}", json={"data": data})
        response.raise_for_status()
        event = response.json()["event_id"]
        with self.http.stream("GET", f"{self.url}/gradio_api/call{api_name}/{event}") as stream:
            kind = None
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    kind = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and kind in ("complete", "error"):
                    if kind == "error":
                        raise RuntimeError(f"{api_name} failed: {line}")
                    return json.loads(line[5:])
        raise RuntimeError(f"{api_name}: the stream ended without a result")

    def close(self) -> None:
        self.http.close()


class LocalFile:
    def __init__(self, path: str) -> None:
        self.path = path


def gallery_captions(gallery: list) -> list[str]:
    """The captions of a gallery answer (gradio_client and REST give ``{"image": ..., "caption": ...}`` items;
    ``[image, caption]`` pairs are accepted too)."""
    captions = []
    for item in gallery:
        if isinstance(item, dict):
            captions.append(str(item.get("caption") or ""))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            captions.append(str(item[1] or ""))
        else:
            raise RuntimeError(f"unexpected gallery item {item!r}")
    return captions


def result_captions(results: list[dict]) -> list[str]:
    """The search API's results as ``Hit.caption`` strings (``"ship · score 0.873"``), for ``check_answers``."""
    return [f"{r.get('label') or r.get('caption') or '#' + str(r['id'])} · score {float(r['score']):.3f}"
            for r in results]


class JsonClient:
    """The plain JSON API: ``POST /api/v1/search`` with ``text`` or ``image_base64`` (httpx, one connection)."""

    def __init__(self, url: str) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=60)

    def predict(self, query: object, k: int, *_: object, api_name: str) -> dict:
        if isinstance(query, LocalFile):
            import base64

            body = {"image_base64": base64.b64encode(Path(query.path).read_bytes()).decode(), "k": k}
        else:
            body = {"text": query, "k": k}
        response = self.http.post(f"{self.url}/api/v1/search", json=body)
        response.raise_for_status()
        return response.json()

    def close(self) -> None:
        self.http.close()


def parse_caption(caption: str) -> tuple[str, float]:
    """``"ship · score 0.873"`` -> ``("ship", 0.873)``."""
    label, separator, score = caption.rpartition(" · score ")
    if not separator:
        raise ValueError(f"not a result caption: {caption!r}")
    return label, float(score)


def same_answer(got: list[str], expected: list[str], tolerance: float = 2e-3) -> str | None:
    """``None`` when two answers agree, else why not: the same number of results, the scores position by
    position within ``tolerance`` (the two sides may run the encoder with different thread counts), and at
    each position the expected label or that of a result tied with it within ``tolerance``."""
    if len(got) != len(expected):
        return f"{len(got)} results, expected {len(expected)}"
    got_pairs, expected_pairs = [parse_caption(c) for c in got], [parse_caption(c) for c in expected]
    for position, ((label, score), (want_label, want_score)) in enumerate(zip(got_pairs, expected_pairs)):
        if abs(score - want_score) > tolerance:
            return f"result {position}: score {score} != {want_score}"
        tied = {other for other, other_score in expected_pairs if abs(other_score - want_score) <= tolerance}
        if label != want_label and label not in tied:
            return f"result {position}: {label!r} != {want_label!r}"
    return None


def check_answers(answers: dict, expected: dict) -> list[str]:
    """``answers``: {(kind, query): [captions of each timed answer]}; ``expected``: {(kind, query): captions}.
    Returns the problems (empty when every answer is right)."""
    problems = []
    for key, repeats in answers.items():
        if key not in expected:
            problems.append(f"{key}: no expected answer")
            continue
        for number, captions in enumerate(repeats):
            why = same_answer(captions, expected[key])
            if why:
                problems.append(f"{key} answer {number}: {why} (got {captions}, expected {expected[key]})")
    return problems


def expected_answers(encoder_dir: Path, index_dir: Path, answers: dict, images: list[str], k: int = 8) -> dict:
    """What the app should answer, computed here: the same encoder and index, ``app.search.search_vector``."""
    from app.search import load_query_image, search_vector
    from export.runtime import Encoder
    from index.search import Index

    encoder, index = Encoder(encoder_dir), Index.load(index_dir)
    expected = {}
    for kind, query in answers:
        if kind == "text":
            vector = encoder.encode_texts([query])[0]
        else:
            vector = encoder.encode_images([load_query_image(query)])[0]
        hits = search_vector(index, vector, k, with_images=False)
        expected[(kind, query)] = [hit.caption for hit in hits]
    return expected


def measure(url: str, images: list[str], queries: int, mode: str, scratch: Path, answers: dict | None = None) -> dict:
    """``mode``: ``api`` (gradio_client), ``rest`` (Gradio's REST API) or ``json`` (``/api/v1/search``).
    ``answers`` collects each timed answer's captions by (kind, query) for ``check_answers``."""
    if mode == "rest":
        client, handle_file = RestClient(url), LocalFile
    elif mode == "json":
        client, handle_file = JsonClient(url), LocalFile
    else:
        from gradio_client import Client, handle_file

        client = Client(url, verbose=False, download_files=False)
    results = {}
    for kind in ("text", "image"):
        latencies, server = [], []
        for number in range(queries + 5):
            if kind == "text":
                query = TEMPLATES[number % len(TEMPLATES)].format(CLASSES[number % len(CLASSES)])
                args, api = (query, 8), "/search_text"
            else:
                query = images[number % len(images)]
                args, api = (handle_file(query), 8), "/search_image"
            if mode == "rest":  # Gradio's REST API fills in no defaults: every input is sent
                args = (*args, [], "", "images")
            start = time.perf_counter()
            output = client.predict(*args, api_name=api)
            elapsed = (time.perf_counter() - start) * 1000
            answer = output[0] if isinstance(output, list) else output  # the REST answer is the list of outputs
            found = answer.get("results") if isinstance(answer, dict) else None
            if not isinstance(found, list) or len(found) != 8:
                raise RuntimeError(f"unexpected answer to {api}: {str(answer)[:300]}")
            if answers is not None:
                answers.setdefault((kind, query), []).append(result_captions(found))
            if number >= 5:  # warm-up excluded
                latencies.append(elapsed)
                server.append(float(answer["elapsed_ms"]))
        results[kind] = {"p50_ms": percentile(latencies, 0.5), "p95_ms": percentile(latencies, 0.95),
                         "mean_ms": statistics.fmean(latencies),
                         "server_p50_ms": percentile(server, 0.5) if server else None,
                         "queries": len(latencies)}
    if hasattr(client, "close"):
        client.close()
    return results


def run(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "manyview-bench-app"))
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--output", default=None, help="write the Markdown report here")
    args = parser.parse_args(argv)
    data, workdir = Path(args.data), Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    encoder, index = prepare(workdir, data)
    sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))
    from screenshots import start_app, stop

    with tempfile.TemporaryDirectory(prefix="manyview-bench-app-") as scratch_name:
        scratch = Path(scratch_name)
        os.environ["GRADIO_TEMP_DIR"] = str(scratch / "gradio")
        images = query_images(data, scratch / "queries", 20)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the server
        process, url = start_app(["--encoder", str(encoder), "--index", str(index)], scratch / "app.log")
        try:
            from index.search import Index

            info = Index.load(index).info
            time.sleep(float(os.environ.get("BENCH_APP_SETTLE_S", "15")))  # the app's shard warm-up
            answers: dict = {}
            figures = {mode: measure(url, images, args.queries, mode, scratch, answers) for mode in MODES}
        finally:
            stop(process)
        problems = check_answers(answers, expected_answers(encoder, index, answers, images))
    import gradio
    import onnxruntime

    result = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load": os.getloadavg(),
                    "python": platform.python_version(),
                    "gradio": gradio.__version__, "onnxruntime": onnxruntime.__version__},
        "index": {"factory": info.get("factory"), "count": info.get("count"),
                  "search_params": info.get("search_params"),
                  "dim": info.get("dim")},
        "figures": figures,
        "checked": {"queries": len(answers), "answers": sum(len(v) for v in answers.values()), "problems": problems},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    result["markdown"] = markdown(result)
    print(result["markdown"])
    print(json.dumps({key: value for key, value in result.items() if key != "markdown"}))
    if args.output:
        Path(args.output).write_text(result["markdown"], encoding="utf-8")
    return result


def markdown(result: dict) -> str:
    machine, index = result["machine"], result["index"]
    lines = [
        "# App latency (tests/benchmarks/bench_app_latency.py)",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores (shared; load average at the end "
        f"{', '.join(f'{x:.1f}' for x in machine['load'])}), no GPU; Python {machine['python']}, "
        f"gradio {machine['gradio']}, onnxruntime {machine['onnxruntime']}. {result['date']}.",
        "",
        f"Collection: all {index['count']:,} CIFAR-10 images (train + test shards, read back from the .tar.gz shards "
        f"for the thumbnails), {index['dim']}-d embeddings of a clip cnn-small model (150 steps), index "
        f"`{index['factory']}` {index['search_params'] or ''} chosen by `index.build`.",
        "",
        "One query at a time against `python -m app` on 127.0.0.1, k = 8, after 5 warm-up queries per kind, "
        "timed from the call to the parsed answer (`{\"results\": [...]}` with thumbnail URLs). *api*: "
        "`gradio_client` `Client.predict(query, 8, api_name=...)`; *rest*: Gradio's REST API with httpx "
        "(upload, `POST /gradio_api/call/<api>`, read the event stream); *json*: the JSON API, "
        "`POST /api/v1/search` with `text` or `image_base64`. *server* is the answer's `elapsed_ms` "
        "(encode + search + metadata).",
        "",
        *([f"Answers checked against `app.search.search_vector` in the benchmark process (same encoder and "
           f"index; labels and scores of all 8 results): {result['checked']['answers']} answers to "
           f"{result['checked']['queries']} distinct queries, {len(result['checked']['problems'])} wrong.", ""]
          if "checked" in result else []),
        "| query | client mode | queries | p50 (ms) | p95 (ms) | mean (ms) | server p50 (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, kinds in result["figures"].items():
        for kind, row in kinds.items():
            name = "text -> image" if kind == "text" else "image -> image (upload)"
            server = f"{row['server_p50_ms']:.0f}" if row["server_p50_ms"] is not None else "n/a"
            lines.append(f"| {name} | {mode} | {row['queries']} | {row['p50_ms']:.0f} | {row['p95_ms']:.0f} | "
                         f"{row['mean_ms']:.0f} | {server} |")
    api = result["figures"].get("api", {})
    if api:
        worst = max(row["p50_ms"] for row in api.values())
        verdict = "met" if worst <= TARGET_P50_MS else "missed"
        lines += ["", f"Target p50 <= {TARGET_P50_MS:.0f} ms end to end through gradio_client (*api*: query in, "
                      f"results with their thumbnail URLs out): {verdict} (worst p50 {worst:.0f} ms).", ""]
    return "\n".join(lines)


if pytest is not None:
    @pytest.mark.benchmark
    def test_app_latency(tmp_path) -> None:
        if not (DEFAULT_DATA / "test-000000.tar.gz").exists():
            pytest.skip(f"CIFAR-10 shards not found at {DEFAULT_DATA}")
        argv = ["--queries", os.environ.get("BENCH_APP_QUERIES", "100")]
        if os.environ.get("BENCH_APP_WORKDIR"):
            argv += ["--workdir", os.environ["BENCH_APP_WORKDIR"]]
        if os.environ.get("BENCH_OUTPUT"):
            argv += ["--output", os.environ["BENCH_OUTPUT"]]
        result = run(argv)
        checked = result["checked"]
        # Every timed answer (3 client modes x 2 kinds x queries + warm-ups) is the in-process search's answer.
        assert checked["answers"] == len(MODES) * 2 * (int(argv[1]) + 5), checked
        assert not checked["problems"], "\n".join(checked["problems"][:20])


if __name__ == "__main__":
    run()
