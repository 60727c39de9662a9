"""The Diagnostics tab: the figures of ``app.diagnostics`` for the served collection, and the model card."""
from __future__ import annotations

import html
import logging
from typing import Any

from app import diagnostics

logger = logging.getLogger(__name__)


def card_markdown(card: dict) -> str:
    rows = "".join(f"| {html.escape(str(key))} | {html.escape(diagnostics_value(value))} |\n" for key, value in card.items())
    return "**Model card**\n\n| field | value |\n|---|---|\n" + rows


def diagnostics_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={diagnostics_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(diagnostics_value(v) for v in value) if len(value) <= 4 else f"{len(value)} items"
    return str(value).replace("|", "&#124;")


def build_diagnostics_tab(collection: Any, tab: Any) -> None:
    """Figures are computed when the tab is first opened (or on the button) and cached on the collection."""
    import gradio as gr

    records = diagnostics.read_metrics(collection.metrics_path)
    button = gr.Button("Compute diagnostics", elem_id="mv-diag-run")
    status = gr.Markdown("Open this tab or press the button to compute the figures on a sample of the collection.",
                         elem_id="mv-diag-status")
    with gr.Row():
        with gr.Column(scale=3):
            table = gr.Markdown(elem_id="mv-diag-table")
        with gr.Column(scale=2):
            norms = gr.Plot(label="Embedding norms", elem_id="mv-diag-norms", format="png")
    with gr.Row():
        with gr.Column(scale=3):
            gr.Markdown(card_markdown(diagnostics.model_card(collection.encoder, collection.index, records)),
                        elem_id="mv-diag-card")
        with gr.Column(scale=2):
            curve = diagnostics.training_curve(records)
            if curve is not None:
                gr.Plot(curve, label="Training curve", elem_id="mv-diag-curve", format="png")
            else:
                gr.Markdown("*No training curve: `metrics.jsonl` was not found next to the encoder "
                            "(pass `--metrics RUN/metrics.jsonl`).*", elem_id="mv-diag-curve")

    def run():
        try:
            result = collection.cached("diagnostics", lambda: diagnostics.compute(collection))
        except Exception as error:  # noqa: BLE001 - keep serving; explain in the tab
            logger.exception("diagnostics failed")
            return f"⚠️ Diagnostics failed ({type(error).__name__}): {html.escape(str(error))}", gr.skip(), gr.skip()
        return (f"Computed on {result['sample']:,} random images.", diagnostics.figures_markdown(result),
                diagnostics.norm_histogram(result["norms"]))

    button.click(run, None, [status, table, norms])
    tab.select(run, None, [status, table, norms])
