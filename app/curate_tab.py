"""The Curate tab: browse the near-duplicate groups, exact duplicates and split leaks that
``python -m index.curate`` wrote beside the served index, and download the ids to drop (CSV or JSON).

The tables are read from ``INDEX/curation/`` (or the directory given); when there are none the tab says
which command writes them and offers to compute them in the app (the same ``index.curate`` code, on the
loaded index). A group's members are shown as a gallery read from their shards (``collection.thumbs``).
The pure functions (``group_overview``, ``group_members``, ``write_drop_file``) need no Gradio; Gradio is
imported only inside ``build_curate_tab``. No torch.
"""
from __future__ import annotations

import csv
import html
import json
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Sequence

from index.curate import OUTPUT_DIRNAME, CurationError, ids_to_drop, is_stale, read_tables
from trainer.data import storage

logger = logging.getLogger(__name__)

VIEWS = {"Near duplicates": "near_duplicates", "Exact duplicates": "exact_duplicates", "Leaks between splits": "leaks"}
EXPORTABLE = {"Near duplicates (all but one per group)": "near_duplicates",
              "Exact duplicates (all but one per group)": "exact_duplicates",
              "Leaks (the copy in the lower split)": "leaks",
              "Outliers": "outliers",
              "Likely label mistakes": "label_mistakes"}
DEFAULT_EXPORT = list(EXPORTABLE)[:3]
FORMATS = ("csv", "json")
MAX_GALLERY = 64
OVERVIEW_HEADERS = ["group", "members", "best score", "splits", "to drop"]


class ExportError(ValueError):
    """A drop-list export that cannot be made (unknown format, nothing chosen)."""


def curation_dir(collection: Any, directory: str | os.PathLike | None = None) -> Path:
    """Where the served index's curation tables live (``INDEX/curation`` unless given)."""
    return Path(directory) if directory is not None else Path(collection.index.directory) / OUTPUT_DIRNAME


def _drop_flags(table: Any) -> list[bool]:
    """Per row: whether the export drops it (``keep`` false, or ``drop`` true)."""
    if "drop" in table.column_names:
        return [bool(value) for value in table.column("drop").to_pylist()]
    return [not bool(value) for value in table.column("keep").to_pylist()]


def group_overview(table: Any) -> list[list]:
    """One row per group of a members table: group, members, best score (hash prefix for exact groups),
    splits, how many the export drops; largest groups first (the table's own group order)."""
    if table is None or table.num_rows == 0:
        return []
    groups = table.column("group").to_pylist()
    splits = table.column("split").to_pylist()
    scores = table.column("score").to_pylist() if "score" in table.column_names else None
    hashes = table.column("hash").to_pylist() if "hash" in table.column_names else None
    drops = _drop_flags(table)
    summary: dict[int, dict] = {}
    for row, group in enumerate(groups):
        entry = summary.setdefault(int(group), {"members": 0, "best": None, "splits": set(), "drop": 0})
        entry["members"] += 1
        entry["splits"].add(splits[row] or "?")
        entry["drop"] += int(drops[row])
        if scores is not None:
            entry["best"] = max(entry["best"] if entry["best"] is not None else -1.0, float(scores[row]))
        elif hashes is not None:
            entry["best"] = f"sha256 {str(hashes[row])[:12]}"
    out = []
    for group in sorted(summary, key=lambda number: (-summary[number]["members"], number)):
        entry = summary[group]
        best = round(entry["best"], 4) if isinstance(entry["best"], float) else entry["best"]
        out.append([group, entry["members"], best, ", ".join(sorted(entry["splits"])), entry["drop"]])
    return out


def group_members(table: Any, group: int) -> list[dict]:
    """The member rows of ``group`` (dicts with id, key, shard, split, ...); ``CurationError`` if none."""
    import pyarrow.compute as pc

    if table is None:
        raise CurationError("no table to browse")
    members = table.filter(pc.equal(table.column("group"), int(group))).to_pylist()
    if not members:
        raise CurationError(f"there is no group {group}; pick one from the list")
    return members


def member_caption(row: dict) -> str:
    """``key · split · score 0.987 · drop`` for a gallery tile (keys read better than 63-bit ids)."""
    parts = [str(row["key"]), row.get("split") or "?"]
    if row.get("score") is not None:
        parts.append(f"score {float(row['score']):.3f}")
    drop = row["drop"] if "drop" in row else not row.get("keep", True)
    parts.append("drop" if drop else "keep")
    return " · ".join(parts)


def write_drop_file(rows: Sequence[dict], fmt: str, directory: str | os.PathLike | None = None,
                    stem: str = "ids_to_drop") -> Path:
    """Write the drop list (``index.curate.ids_to_drop`` rows: id, key, shard, reasons) as CSV (columns id,
    key, shard, reasons joined by ';') or JSON (``{"count": n, "ids": [...], "items": [...]}``) to a new
    file in ``directory`` (default: the system temporary directory, which Gradio may serve); returns it."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose csv or json")
    folder = Path(directory) if directory is not None else Path(tempfile.gettempdir()) / "manyview-curate"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}-{uuid.uuid4().hex[:8]}.{fmt}"

    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8", newline="") as handle:
            if fmt == "csv":
                writer = csv.writer(handle)
                writer.writerow(["id", "key", "shard", "reasons"])
                for row in rows:
                    writer.writerow([row["id"], row["key"], row["shard"], ";".join(row["reasons"])])
            else:
                json.dump({"count": len(rows), "ids": [row["id"] for row in rows], "items": list(rows)}, handle,
                          indent=1)
                handle.write("\n")

    storage.replace_local(path, write)
    return path


def export_drop_list(tables: dict, choices: Sequence[str], fmt: str, directory: str | os.PathLike | None = None
                     ) -> tuple[Path, int]:
    """The drop list of the chosen ``EXPORTABLE`` labels (or table names) written as ``fmt``: (path, count)."""
    include = [EXPORTABLE.get(choice, choice) for choice in choices or []]
    if not include:
        raise ExportError("choose at least one list to export")
    rows = ids_to_drop(tables, include)
    return write_drop_file(rows, fmt, directory), len(rows)


def summary_markdown(summary: dict, directory: Path, stale: bool) -> str:
    """Counts and parameters of a curation run, for the tab's header."""
    params = summary.get("params") or {}
    near = summary.get("near_duplicates") or {}
    exact = summary.get("exact_duplicates") or {}
    leaks = summary.get("leaks") or {}
    verification = summary.get("verification") or {}
    if verification.get("mode") == "thumbnail":  # pairs were kept by their pixels, not by the embedding cosine
        rule = f"pixel-verified, thumbnail cosine >= {verification.get('threshold')}"
        leak_rule = rule
    else:
        rule = f"cosine >= {params.get('threshold')}"
        leak_rule = f"cosine >= {params.get('leak_threshold')}"
    lines = [
        f"**Curation of {summary.get('count', 0):,} items** ({html.escape(str(summary.get('created', '?')))}; "
        f"`{html.escape(str(directory))}`)",
        f"- near-duplicate groups ({rule}): {near.get('groups', 0):,} "
        f"holding {near.get('items', 0):,} items, {near.get('to_drop', 0):,} to drop",
        f"- exact duplicates (same image bytes): {exact.get('groups', 0):,} groups, {exact.get('items', 0):,} items",
        f"- leaks between splits ({leak_rule}): {leaks.get('items', 0):,} items, "
        f"{leaks.get('to_drop', 0):,} to drop",
        f"- likely label mistakes: {summary.get('label_mistakes', 0):,} of {summary.get('labelled', 0):,} labelled; "
        f"outliers: {summary.get('outliers', 0):,}",
    ]
    if stale:
        lines.append("\n⚠️ These tables were computed from another version of the index: compute them again.")
    return "\n".join(lines)


def build_curate_tab(collection: Any, tab: Any = None, directory: str | os.PathLike | None = None) -> None:
    """The tab's components and events, inside an open ``gr.Tab`` (``tab``: that tab, loaded when selected).

    ``directory``: where the tables are (default ``INDEX/curation`` of the served image index).
    """
    import gradio as gr

    folder = curation_dir(collection, directory)
    tables_state = gr.State(None)  # per browser session: one person's Load does not change another's view
    private = {"api_visibility": "private"}  # the page's own events, not part of the app's API

    status = gr.Markdown(f"Press **Load** to read the curation tables in `{html.escape(str(folder))}`.",
                         elem_id="mv-curate-status")
    with gr.Row():
        load_button = gr.Button("Load", elem_id="mv-curate-load")
        compute_button = gr.Button("Compute now", elem_id="mv-curate-compute")
    with gr.Row():
        with gr.Column(scale=2):
            view = gr.Radio(list(VIEWS), value=list(VIEWS)[0], label="Browse", elem_id="mv-curate-view")
            overview = gr.Dataframe(headers=OVERVIEW_HEADERS, interactive=False, label="Groups (click one)",
                                    elem_id="mv-curate-groups", max_height=360)
            group_box = gr.Number(label="Group", precision=0, value=0, elem_id="mv-curate-group")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Members", columns=6, height="auto", object_fit="contain",
                                 elem_id="mv-curate-gallery")
            group_status = gr.Markdown(elem_id="mv-curate-group-status")
    with gr.Accordion("Export the ids to drop", open=True, elem_id="mv-curate-export"):
        with gr.Row():
            include = gr.CheckboxGroup(list(EXPORTABLE), value=DEFAULT_EXPORT, label="Drop",
                                       elem_id="mv-curate-include")
            fmt = gr.Radio(list(FORMATS), value="csv", label="Format", elem_id="mv-curate-format")
        export_button = gr.Button("Export", variant="primary", elem_id="mv-curate-export-button")
        export_status = gr.Markdown(elem_id="mv-curate-export-status")
        download = gr.File(label="Ids to drop", elem_id="mv-curate-download", interactive=False)

    def load(current: Any) -> tuple:
        try:
            tables, summary = read_tables(folder)
        except CurationError as error:
            return (f"{html.escape(str(error))}. Or press **Compute now** (it reads every image once).",
                    gr.update(value=[]), current)
        return summary_markdown(summary, folder, is_stale(summary, collection.index)), gr.update(value=[]), tables

    def compute(current: Any) -> tuple:
        from index.curate import curate_loaded

        try:
            curate_loaded(collection.index, folder, progress=False)
        except (CurationError, FileNotFoundError, KeyError) as error:
            return f"⚠️ Curation failed: {html.escape(str(error))}", gr.update(value=[]), current
        return load(current)

    def show_overview(choice: str, tables: Any) -> Any:
        tables = tables or {}
        return gr.update(value=group_overview(tables.get(VIEWS.get(choice, "near_duplicates"))))

    def show_group(choice: str, group: Any, tables: Any) -> tuple:
        if tables is None:
            return gr.update(value=[]), "Load the tables first."
        try:
            members = group_members(tables.get(VIEWS.get(choice, "near_duplicates")), int(group or 0))
            shown = members[:MAX_GALLERY]
            images = collection.thumbs.images(shown)
        except (CurationError, FileNotFoundError, KeyError, ValueError) as error:
            return gr.update(value=[]), f"⚠️ {html.escape(str(error))}"
        more = f" (first {MAX_GALLERY} shown)" if len(members) > MAX_GALLERY else ""
        return ([(image, member_caption(row)) for image, row in zip(images, shown)],
                f"Group {int(group)}: {len(members)} members{more}.")

    def on_row(choice: str, tables: Any, event: gr.SelectData) -> tuple:
        rows = group_overview((tables or {}).get(VIEWS.get(choice, "near_duplicates")))
        position = event.index[0] if isinstance(event.index, (list, tuple)) else event.index
        if not rows or position is None or int(position) >= len(rows):
            return gr.skip(), gr.update(value=[]), "No group there."
        group = rows[int(position)][0]
        gallery_value, message = show_group(choice, group, tables)
        return group, gallery_value, message

    on_row.__annotations__["event"] = gr.SelectData  # resolved here: this module's annotations are strings

    def export(choices: list[str], chosen_format: str, tables: Any) -> tuple:
        if tables is None:
            return None, "Load the tables first."
        try:
            path, count = export_drop_list(tables, choices, chosen_format)
        except (ExportError, CurationError) as error:
            return None, f"⚠️ {html.escape(str(error))}"
        return str(path), f"{count:,} ids to drop."

    loaded = [status, gallery, tables_state]
    load_event = load_button.click(load, [tables_state], loaded, **private)
    load_event.then(show_overview, [view, tables_state], [overview], **private)
    compute_button.click(compute, [tables_state], loaded, **private).then(
        show_overview, [view, tables_state], [overview], **private)
    view.change(show_overview, [view, tables_state], [overview], **private)
    group_box.submit(show_group, [view, group_box, tables_state], [gallery, group_status], **private)
    overview.select(on_row, [view, tables_state], [group_box, gallery, group_status], **private)
    export_button.click(export, [include, fmt, tables_state], [download, export_status], **private)
    if tab is not None:
        tab.select(load, [tables_state], loaded, **private).then(show_overview, [view, tables_state], [overview],
                                                                 **private)
