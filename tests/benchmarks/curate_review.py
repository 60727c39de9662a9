"""Precision of curation against a hand-labelled truth: CIFAR-10's own duplicates counted, not only the planted ones.

    # 1. the pairs the default curation keeps that are not planted, as contact sheets to look at
    flock /tmp/manyview-bench.lock python tests/benchmarks/curate_review.py sheets --encoder simclr --out /tmp/review
    # 2. a person looks at every sheet and writes the verdicts into tests/benchmarks/curate_labels.json
    # 3. precision and recall with planted + labelled pairs as the truth, appended to RESULTS_curate.md
    flock /tmp/manyview-bench.lock python tests/benchmarks/curate_review.py score --encoder simclr

Why: ``bench_curate.py`` counts a pair as right only when it was planted, but CIFAR-10 holds its own duplicates
(Barz & Denzler, ciFAIR 2020: about 3% of the test images have a near copy in the training set), and curation
finds those too. Counted as errors they hide the real precision; this script lets a person decide them.

What is labelled: the *edges* the default run keeps (candidate pairs whose pixel verification reaches
``DEFAULT_VERIFY_THRESHOLD``), not every pair inside a group. "Same photograph" is transitive, so the pairs of a
group that are right are those joined by a path of right edges: the score step removes the edges labelled
``different`` (and any edge left unlabelled, counted as wrong) and counts, inside every group, the pairs that
stay connected. A flagged leak is right when one of its cross-split edges is. Labels are keyed by the two sample
keys (sorted, ``a|b``), so they hold for any encoder; an edge another encoder keeps that no one labelled counts as
wrong, and the report says how many there were.

Verdicts: ``same`` (the same photograph: possibly recoloured, cropped, rescaled, mirrored or re-encoded) or
``different`` (two photographs, however alike).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "tests", ROOT / "tests" / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

LABELS = ROOT / "tests" / "benchmarks" / "curate_labels.json"
CELL = 96  # pixels per image on a sheet (CIFAR-10's 32 x 3)
COLUMNS, ROWS = 8, 10


def pair_key(a: str, b: str) -> str:
    return "|".join(sorted((str(a), str(b))))


def kept_edges(workdir: Path, data: Path, encoder_name: str) -> dict:
    """The verified candidate edges of the default curation run, as sample keys and pixel scores (computed once
    with ``bench_curate``'s own setup, cached in ``workdir/edges-<encoder>.npz``)."""
    from bench_curate import VERIFY_THRESHOLDS, _prepared
    from index.curate import (DEFAULT_CANDIDATE_THRESHOLD, DEFAULT_CANDIDATES, DEFAULT_K, Verifier,
                              collection_vectors, neighbourhood, read_images, split_column)
    from index.search import Index

    cache = workdir / f"edges-{encoder_name}.npz"
    index_dir, truth = _prepared(workdir, data, encoder_name)
    if not cache.exists():
        index = Index.load(index_dir)
        vectors, _ = collection_vectors(index, progress=False)
        _, thumbs, smalls = read_images(index.metadata, hashes=False, thumbs=True, progress=True, small=True)
        hood = neighbourhood(index, vectors, DEFAULT_K, DEFAULT_CANDIDATE_THRESHOLD, progress=True,
                             verifier=Verifier(thumbs, min(VERIFY_THRESHOLDS), smalls, align_below=1.0),
                             candidates=DEFAULT_CANDIDATES)
        keys = np.asarray(index.metadata.column("key").to_pylist(), dtype=object)
        shards = np.asarray(index.metadata.column("shard").to_pylist(), dtype=object)
        splits = np.asarray(split_column(shards.tolist()), dtype=object)
        np.savez(cache, a=keys[hood.pairs[:, 0]].astype(str), b=keys[hood.pairs[:, 1]].astype(str),
                 verify=hood.pair_verify, keys=keys.astype(str), shards=shards.astype(str), splits=splits.astype(str))
    stored = np.load(cache, allow_pickle=False)
    return {"a": stored["a"], "b": stored["b"], "verify": stored["verify"], "keys": stored["keys"],
            "shards": stored["shards"], "splits": stored["splits"], "truth": truth}


def planted_keys(truth: dict) -> set[str]:
    from bench_curate import truth_pairs

    return {pair_key(*tuple(pair)) for pair in truth_pairs(truth)}


def to_review(edges: dict, threshold: float) -> list[tuple[str, str, float]]:
    """The kept edges at ``threshold`` that were not planted, highest score first."""
    planted = planted_keys(edges["truth"])
    kept = edges["verify"] >= threshold
    out = {pair_key(a, b): (a, b, float(v)) for a, b, v in zip(edges["a"][kept], edges["b"][kept],
                                                                edges["verify"][kept])}
    return sorted((value for key, value in out.items() if key not in planted), key=lambda item: (-item[2], item[0]))


def images_for(keys: set[str], edges: dict) -> dict:
    """key -> PIL image, reading each shard that holds one of ``keys`` once."""
    from trainer.data.shards import decode_image, iter_shard

    shard_of = dict(zip(edges["keys"].tolist(), edges["shards"].tolist()))
    wanted: dict[str, set[str]] = {}
    for key in keys:
        wanted.setdefault(shard_of[key], set()).add(key)
    found = {}
    for shard, names in sorted(wanted.items()):
        for sample in iter_shard(shard):
            if sample.key in names:
                found[sample.key] = decode_image(sample.image)
    return found


def write_sheets(pairs: list[tuple[str, str, float]], edges: dict, out: Path) -> list[dict]:
    """Contact sheets of ``pairs`` (``COLUMNS`` x ``ROWS`` a sheet; each cell: number, the two images, score)
    and ``pairs.json`` (sheet, cell -> keys). Returns the listing."""
    from PIL import Image, ImageDraw

    out.mkdir(parents=True, exist_ok=True)
    images = images_for({key for a, b, _ in pairs for key in (a, b)}, edges)
    splits = dict(zip(edges["keys"].tolist(), edges["splits"].tolist()))
    per_sheet, width, height = COLUMNS * ROWS, 2 * CELL + 12, CELL + 16
    listing = []
    for sheet_number, start in enumerate(range(0, len(pairs), per_sheet)):
        sheet = Image.new("RGB", (COLUMNS * width, ROWS * height), "white")
        draw = ImageDraw.Draw(sheet)
        for cell, (a, b, score) in enumerate(pairs[start:start + per_sheet]):
            x, y = (cell % COLUMNS) * width, (cell // COLUMNS) * height
            sheet.paste(images[a].resize((CELL, CELL), Image.NEAREST), (x + 2, y + 14))
            sheet.paste(images[b].resize((CELL, CELL), Image.NEAREST), (x + CELL + 6, y + 14))
            draw.text((x + 2, y + 1), f"{cell}  {score:.3f} {splits[a][:2]}/{splits[b][:2]}", fill="black")
            listing.append({"sheet": sheet_number, "cell": cell, "a": a, "b": b, "score": round(score, 4)})
        sheet.save(out / f"sheet-{sheet_number:03d}.png")
    (out / "pairs.json").write_text(json.dumps(listing, indent=1))
    return listing


def read_labels(path: Path = LABELS) -> dict[str, str]:
    if not path.exists():
        return {}
    labels = json.loads(path.read_text())["labels"]
    bad = {key: value for key, value in labels.items() if value not in ("same", "different")}
    if bad:
        raise ValueError(f"{path}: verdicts must be 'same' or 'different': {list(bad.items())[:3]}")
    return labels


def labelled_rows(edges: dict, labels: dict[str, str], thresholds: tuple[float, ...]) -> list[dict]:
    """Recall and precision with planted + labelled-``same`` edges as the truth, per verification threshold."""
    from bench_curate import truth_pairs
    from index.curate import components, group_numbers

    truth = edges["truth"]
    keys = edges["keys"]
    row_of = {key: row for row, key in enumerate(keys.tolist())}
    pairs = np.array([[row_of[a], row_of[b]] for a, b in zip(edges["a"].tolist(), edges["b"].tolist())],
                     dtype=np.int64).reshape(-1, 2)
    planted = planted_keys(truth)
    edge_keys = [pair_key(a, b) for a, b in zip(edges["a"].tolist(), edges["b"].tolist())]
    is_planted = np.array([key in planted for key in edge_keys], dtype=bool)
    verdict = np.array([labels.get(key) for key in edge_keys], dtype=object)
    right = is_planted | (verdict == "same")
    unlabelled = ~is_planted & np.array([value is None for value in verdict], dtype=bool)
    planted_pairs = truth_pairs(truth)
    test_copies = set(truth["near"]) | {copy for copy, source in truth["exact"].items() if source.startswith("test_")}
    splits = edges["splits"]
    rows = []
    for threshold in thresholds:
        kept = edges["verify"] >= threshold
        groups = group_numbers(components(len(keys), pairs[kept]))
        right_groups = group_numbers(components(len(keys), pairs[kept & right]))
        found = _pairs_within(groups)
        true = _pairs_within(right_groups)  # right components lie inside the groups
        recalled = sum(1 for pair in planted_pairs for a, b in [tuple(pair)]
                       if right_groups[row_of[a]] >= 0 and right_groups[row_of[a]] == right_groups[row_of[b]])
        cross = kept & (splits[pairs[:, 0]] != splits[pairs[:, 1]])
        train_end = np.where(splits[pairs[:, 0]] == "train", pairs[:, 0], pairs[:, 1])
        flagged = set(keys[train_end[cross]].tolist())
        right_leaks = set(keys[train_end[cross & right]].tolist())
        rows.append({"threshold": threshold, "dup_recall": recalled / len(planted_pairs),
                     "dup_precision": true / max(1, found), "dup_pairs": found, "dup_right": true,
                     "leak_recall": len(right_leaks & test_copies) / len(test_copies),
                     "leak_precision": len(right_leaks) / max(1, len(flagged)), "leak_flagged": len(flagged),
                     "unlabelled_edges": int((kept & unlabelled).sum()), "kept_edges": int(kept.sum()),
                     "different_edges": int((kept & (verdict == "different")).sum())})
    return rows


def _pairs_within(groups: np.ndarray) -> int:
    sizes = np.bincount(groups[groups >= 0]) if (groups >= 0).any() else np.zeros(0, dtype=np.int64)
    return int((sizes * (sizes - 1) // 2).sum())


def append_results(path: Path, rows: list[dict], encoder_name: str, labels: dict, note: str) -> None:
    """Append the labelled-truth table (thresholds whose kept edges are all planted or labelled) to ``path``."""
    from bench_app_latency import cpu_model
    from bench_curate import fmt
    from index.curate import DEFAULT_VERIFY_THRESHOLD

    lines = ["", f"## Precision with CIFAR-10's own duplicates labelled by hand ({encoder_name} model, verified)", "",
             f"Run {datetime.date.today().isoformat()} on {cpu_model()} ({os.cpu_count()} cores){note}. Commands:", "",
             f"    flock /tmp/manyview-bench.lock .venv/bin/python tests/benchmarks/curate_review.py sheets "
             f"--encoder {encoder_name} --out /tmp/review",
             f"    flock /tmp/manyview-bench.lock .venv/bin/python tests/benchmarks/curate_review.py score "
             f"--encoder {encoder_name}", "",
             f"Truth: the planted pairs plus the {len(labels):,} hand-labelled edges of `curate_labels.json` "
             f"({sum(v == 'same' for v in labels.values()):,} `same`, "
             f"{sum(v == 'different' for v in labels.values()):,} `different`): every unplanted edge kept at "
             f"{rows[0]['threshold']}, the lowest threshold shown (higher ones keep a subset). Duplicate pairs are "
             "every pair inside a group; right are those joined by right edges. An unlabelled edge counts as "
             "wrong.", "",
             "| verify threshold | dup recall | dup precision | pairs found | pairs right | leak recall "
             "| leak precision | train items flagged | kept edges | labelled different | unlabelled |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        mark = " **(default)**" if abs(row["threshold"] - DEFAULT_VERIFY_THRESHOLD) < 1e-9 else ""
        lines.append(f"| {row['threshold']}{mark} | {fmt(row['dup_recall'])} | {fmt(row['dup_precision'])} | "
                     f"{row['dup_pairs']:,} | {row['dup_right']:,} | {fmt(row['leak_recall'])} | "
                     f"{fmt(row['leak_precision'])} | {row['leak_flagged']:,} | {row['kept_edges']:,} | "
                     f"{row['different_edges']:,} | {row['unlabelled_edges']:,} |")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    from bench_curate import DEFAULT_DATA, VERIFY_THRESHOLDS
    from index.curate import DEFAULT_VERIFY_THRESHOLD

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["sheets", "score"])
    parser.add_argument("--encoder", choices=["simclr", "clip"], default="simclr")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "manyview-bench-curate"))
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "manyview-curate-review"))
    parser.add_argument("--labels", default=str(LABELS))
    parser.add_argument("--output", default=str(ROOT / "tests" / "benchmarks" / "RESULTS_curate.md"))
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    edges = kept_edges(workdir, Path(args.data), args.encoder)
    labels = read_labels(Path(args.labels))
    pending = to_review(edges, DEFAULT_VERIFY_THRESHOLD)
    if args.command == "sheets":
        listing = write_sheets([p for p in pending if pair_key(p[0], p[1]) not in labels], edges, Path(args.out))
        print(f"{len(pending):,} unplanted edges kept at {DEFAULT_VERIFY_THRESHOLD}; {len(listing):,} not yet "
              f"labelled, on {-(-len(listing) // (COLUMNS * ROWS))} sheet(s) in {args.out}")
        return 0
    rows = [row for row in labelled_rows(edges, labels, VERIFY_THRESHOLDS) if row["unlabelled_edges"] == 0]
    for row in rows:
        print(json.dumps(row))
    if args.output and rows:
        append_results(Path(args.output), rows, args.encoder, labels, args.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
