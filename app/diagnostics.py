"""Is the model any good? Figures computed on a sample of the indexed collection, without torch.

* embedding norms of the raw (un-normalised) encoder outputs: a histogram; a spike near 0 or a huge
  spread hints at a broken export or collapse;
* alignment and uniformity (Wang & Isola 2020) of the L2-normalised embeddings:
  ``alignment = mean ||f(x) - f(x')||^2`` over (image, augmented image) pairs (and over (image, its
  caption) pairs for image-text models), ``uniformity = log mean_{i<j} exp(-2 ||f(x_i) - f(x_j)||^2)``;
  both lower is better (uniformity is -4 for points spread over a high-dimensional sphere, 0 when
  every point is the same);
* kNN accuracy (weighted vote, k = 20, tau = 0.1) of each sampled image against its neighbours in the
  index (itself left out), when the metadata has labels;
* zero-shot accuracy for image-text models: "a photo of a {class}." prompts, nearest prompt wins;
* index recall@k against exact search over the stored vectors, on sampled queries;
* the model card and the training curve from ``metrics.jsonl``.
"""
from __future__ import annotations

import inspect
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

KNN_K, KNN_TAU = 20, 0.1
RECALL_K, RECALL_QUERIES = 10, 200
UNIFORMITY_T = 2.0
ZERO_SHOT_PROMPT = "a photo of a {}."


# ----------------------------------------------------------------------------------------------------
# pure computations
# ----------------------------------------------------------------------------------------------------


def alignment(a: np.ndarray, b: np.ndarray, alpha: float = 2.0) -> float:
    """``mean_i ||a_i - b_i||^alpha`` for paired rows of ``a`` and ``b`` [N, D]."""
    distances = np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64), axis=1)
    return float(np.mean(distances ** alpha))


def uniformity(x: np.ndarray, t: float = UNIFORMITY_T) -> float:
    """``log mean_{i<j} exp(-t ||x_i - x_j||^2)`` over the distinct pairs of rows of ``x`` [N, D], N >= 2."""
    x = np.asarray(x, np.float64)
    if len(x) < 2:
        raise ValueError("uniformity needs at least two points")
    squared = np.sum(x * x, axis=1)
    distances = np.maximum(squared[:, None] + squared[None, :] - 2.0 * x @ x.T, 0.0)
    upper = distances[np.triu_indices(len(x), k=1)]
    return float(np.log(np.mean(np.exp(-t * upper))))


def weighted_knn_predict(neighbour_labels: np.ndarray, neighbour_scores: np.ndarray, tau: float = KNN_TAU) -> np.ndarray:
    """Per row, the label with the largest sum of ``exp(score / tau)`` over its neighbours (-1 labels ignored;
    ties go to the smaller label)."""
    predictions = np.full(len(neighbour_labels), -1, dtype=np.int64)
    for row, (labels, scores) in enumerate(zip(neighbour_labels, neighbour_scores)):
        valid = labels >= 0
        if not valid.any():
            continue
        weights = np.exp((scores[valid] - scores[valid].max()) / tau)  # shifted: same argmax, no overflow
        classes, inverse = np.unique(labels[valid], return_inverse=True)
        predictions[row] = classes[int(np.argmax(np.bincount(inverse, weights=weights)))]
    return predictions


def accuracy(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of rows with ``truth >= 0`` where ``predicted == truth``."""
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    known = truth >= 0
    return float(np.mean(predicted[known] == truth[known])) if known.any() else float("nan")


def zero_shot_predict(image_vectors: np.ndarray, class_vectors: np.ndarray, class_labels: Sequence[int]) -> np.ndarray:
    """The label of the most similar class prompt for each (normalised) image embedding."""
    similarity = np.asarray(image_vectors, np.float32) @ np.asarray(class_vectors, np.float32).T
    return np.asarray(class_labels, dtype=np.int64)[np.argmax(similarity, axis=1)]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_row intersect truth_row| / |truth_row| (ids < 0 ignored)."""
    total = 0.0
    for approx, exact in zip(found, truth):
        exact = exact[exact >= 0]
        if len(exact):
            total += len(np.intersect1d(approx[approx >= 0], exact)) / len(exact)
    return total / max(1, len(found))


def augment(image: Any, rng: np.random.Generator, min_area: float = 0.6) -> Any:
    """A positive view for alignment: random crop of ``min_area``..1 of the area, resized back, flipped half the time."""
    from PIL import Image

    width, height = image.size
    area = rng.uniform(min_area, 1.0)
    side_w, side_h = max(1, int(round(width * math.sqrt(area)))), max(1, int(round(height * math.sqrt(area))))
    left, top = int(rng.integers(0, width - side_w + 1)), int(rng.integers(0, height - side_h + 1))
    view = image.crop((left, top, left + side_w, top + side_h)).resize((width, height), Image.BICUBIC)
    return view.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else view


def raw_image_embeddings(encoder: Any, images: Sequence[Any], batch_size: int = 64) -> np.ndarray | None:
    """The encoder's outputs before L2 normalisation (``encode_images(..., normalize=False)``), or None
    when the encoder cannot give them (an encoder-like object without that option)."""
    encode = getattr(encoder, "encode_images", None)
    try:
        takes_normalize = encode is not None and "normalize" in inspect.signature(encode).parameters
    except (TypeError, ValueError):  # not introspectable
        takes_normalize = False
    if not takes_normalize:
        return None
    raw = encode(list(images), batch_size=batch_size, normalize=False)
    return np.asarray(raw, dtype=np.float32) if len(raw) else None


def find_metrics(encoder_dir: str | os.PathLike | None, explicit: str | os.PathLike | None = None) -> Path | None:
    """``explicit``, else ``metrics.jsonl`` in the encoder directory or its parent (``RUN/onnx`` -> ``RUN``)."""
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    if encoder_dir is None:
        return None
    directory = Path(encoder_dir).expanduser().resolve()
    for candidate in (directory / "metrics.jsonl", directory.parent / "metrics.jsonl"):
        if candidate.is_file():
            return candidate
    return None


def read_metrics(path: str | os.PathLike | None) -> list[dict]:
    """The records of a ``metrics.jsonl`` that have a ``step`` (bad lines, e.g. a half-written last one, skipped)."""
    if path is None or not Path(path).is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
                records.append(record)
    return records


def curve(records: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the numeric, finite ``key`` entries of ``records``."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(float(record["step"]))
            values.append(float(value))
    return steps, values


# ----------------------------------------------------------------------------------------------------
# on a collection
# ----------------------------------------------------------------------------------------------------


def index_recall(index: Any, queries: np.ndarray, k: int = RECALL_K) -> float | None:
    """recall@k of ``index.search`` against exact search over the stored vectors; None for compressed indexes."""
    from index.store import stored_vectors
    from index.tune import exact_neighbours

    blocks = stored_vectors(index.faiss_index)
    if blocks is None or not len(queries):
        return None
    k = min(k, index.count)
    truth = exact_neighbours(queries, blocks, k)
    _, found = index.search(queries, k)
    return recall(found, truth.ids)


def compute(collection: Any, seed: int = 0) -> dict:
    """Every figure of the tab as a dictionary (plain numbers, lists and strings)."""
    sample = collection.sample()
    index, encoder = collection.index, collection.encoder
    count = min(len(sample.ids), collection.diagnostics_count)
    images, vectors, records = sample.images[:count], sample.vectors[:count], sample.records[:count]
    labels = np.asarray([int(r.get("label", -1)) if r.get("label") is not None else -1 for r in records], np.int64)
    result: dict[str, Any] = {"sample": count, "collection": index.count}
    raw = raw_image_embeddings(encoder, images)
    norms = np.linalg.norm(raw if raw is not None else vectors, axis=1)
    result["norms"] = norms.tolist()
    result["norms_raw"] = raw is not None
    rng = np.random.default_rng(seed)
    views = encoder.encode_images([augment(image, rng) for image in images])
    result["alignment"] = alignment(vectors, views)
    result["uniformity"] = uniformity(vectors)
    captions = [str(r.get("caption") or "") for r in records]
    if encoder.has_text and any(captions):
        paired = [i for i, caption in enumerate(captions) if caption]
        result["alignment_text"] = alignment(vectors[paired], encoder.encode_texts([captions[i] for i in paired]))
    if (labels >= 0).any():
        k = min(KNN_K, index.count - 1)
        scores, ids = index.search(vectors, k + 1)
        keep = [[j for j in range(ids.shape[1]) if ids[row, j] != sample.ids[row] and ids[row, j] >= 0][:k]
                for row in range(len(ids))]
        flat = [int(ids[row, j]) for row, cols in enumerate(keep) for j in cols]
        by_id = {int(r["id"]): int(r.get("label", -1)) for r in index.records(sorted(set(flat)))}
        width = max((len(cols) for cols in keep), default=0)
        neighbour_labels = np.full((len(ids), width), -1, np.int64)
        neighbour_scores = np.full((len(ids), width), -np.inf, np.float32)
        for row, cols in enumerate(keep):
            neighbour_labels[row, :len(cols)] = [by_id[int(ids[row, j])] for j in cols]
            neighbour_scores[row, :len(cols)] = scores[row, cols]
        result["knn_top1"] = accuracy(weighted_knn_predict(neighbour_labels, neighbour_scores), labels)
        result["knn_k"] = k
        classes = sorted({(int(r["label"]), str(r.get("label_name") or "")) for r in records if int(r.get("label", -1)) >= 0})
        if encoder.has_text and classes and all(name for _, name in classes):
            prompts = encoder.encode_texts([ZERO_SHOT_PROMPT.format(name) for _, name in classes])
            result["zero_shot_top1"] = accuracy(zero_shot_predict(vectors, prompts, [c for c, _ in classes]), labels)
            result["zero_shot_classes"] = len(classes)
    queries = np.ascontiguousarray(vectors[:RECALL_QUERIES], dtype=np.float32)
    result["recall"] = index_recall(index, queries)
    result["recall_k"] = min(RECALL_K, index.count)
    result["recall_queries"] = len(queries)
    result["metrics_path"] = str(collection.metrics_path) if collection.metrics_path else None
    return result


def figures_markdown(result: dict) -> str:
    """The figures of ``compute`` as a Markdown table with a short reading guide per row."""
    def fmt(value: Any, digits: int = 3) -> str:
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    norms = np.asarray(result["norms"])
    rows = [
        ("sample", f"{result['sample']:,} of {result['collection']:,} images", "random, fixed seed"),
        ("embedding norm" + ("" if result["norms_raw"] else " (stored)"),
         f"mean {fmt(norms.mean())} · std {fmt(norms.std())} · min {fmt(norms.min())} · max {fmt(norms.max())}",
         "before L2 normalisation"),
        ("alignment (image, augmented image)", fmt(result["alignment"]), "0 = views coincide; lower is better"),
        ("uniformity (t = 2)", fmt(result["uniformity"]), "-4 = spread over the sphere, 0 = collapsed; lower is better"),
    ]
    if "alignment_text" in result:
        rows.append(("alignment (image, its caption)", fmt(result["alignment_text"]), "lower is better; 2 = unrelated"))
    if "knn_top1" in result:
        rows.append((f"kNN top-1 (k = {result['knn_k']}, tau = {KNN_TAU})", fmt(result["knn_top1"]), "neighbours from the index, self left out"))
    else:
        rows.append(("kNN top-1", "n/a", "the metadata has no labels"))
    if "zero_shot_top1" in result:
        rows.append((f"zero-shot top-1 ({result['zero_shot_classes']} classes)", fmt(result["zero_shot_top1"]),
                     f"prompt '{ZERO_SHOT_PROMPT.format('{class}')}'"))
    recall_text = fmt(result["recall"]) if result["recall"] is not None else "n/a (compressed index: use `python -m index.evaluate --base EMB`)"
    rows.append((f"index recall@{result['recall_k']} vs exact", recall_text, f"{result['recall_queries']} sampled queries"))
    body = "".join(f"| {name} | {value} | {note} |\n" for name, value, note in rows)
    return "| figure | value | how to read it |\n|---|---|---|\n" + body


def norm_histogram(norms: Sequence[float]) -> Any:
    """A matplotlib figure (no pyplot: safe in server threads)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3), dpi=100)
    axes = figure.add_subplot()
    axes.hist(np.asarray(norms), bins=40, color="#4c72b0")
    axes.set_xlabel("embedding norm")
    axes.set_ylabel("images")
    axes.set_title("Embedding norms")
    figure.tight_layout()
    return figure


def training_curve(records: Sequence[dict]) -> Any | None:
    """Loss (and kNN / embedding std when logged) against the step; None without records."""
    from matplotlib.figure import Figure

    steps, losses = curve(records, "loss")
    if not steps:
        return None
    figure = Figure(figsize=(5, 3), dpi=100)
    axes = figure.add_subplot()
    axes.plot(steps, losses, color="#dd8452", label="loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    extra = [key for key in ("embedding_std", "knn_top1") if curve(records, key)[0]]
    if extra:
        twin = axes.twinx()
        for key, colour in zip(extra, ("#55a868", "#8172b3")):
            twin.plot(*curve(records, key), color=colour, label=key)
        twin.legend(loc="upper right", fontsize=8)
    axes.legend(loc="upper left", fontsize=8)
    axes.set_title("Training curve (metrics.jsonl)")
    figure.tight_layout()
    return figure


def model_card(encoder: Any, index: Any, records: Sequence[dict]) -> dict:
    """Objective, backbone, steps and the rest of ``preprocess.json``'s model entry, plus the last metrics."""
    model = dict((getattr(encoder, "info", {}) or {}).get("model") or {})
    card = {name: model.get(name) for name in ("objective", "backbone", "steps", "embed_dim") if model.get(name) is not None}
    card.update({name: value for name, value in model.items() if name not in card and name not in ("mean", "std")})
    if records:
        last = records[-1]
        card["last logged step"] = last.get("step")
        if isinstance(last.get("loss"), (int, float)):
            card["last loss"] = round(float(last["loss"]), 4)
    card["index"] = f"{index.info.get('factory', '?')} over {index.count:,} vectors"
    return card
