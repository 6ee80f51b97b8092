"""index.html: one self-contained page (inline CSS, images as data URIs) that opens from disk offline."""

from __future__ import annotations

import base64
import html

import pandas as pd

from ..plan import Plan
from .tables import ModuleGrid

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th { background: #f2f2f2; } td.text, th.text { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; margin-top: 0.3em; }
.scroll { max-height: 40em; overflow: auto; } .dataframe td:first-child { text-align: left; }
"""

# Module table columns shown on the page; modules.csv contains every column.
_TABLE_COLUMNS = {
    "module": "module",
    "row": "layer",
    "label": "type",
    "d_out": "d_out",
    "d_in": "d_in",
    "rank": "rank",
    "energy_score": "energy score",
    "captured_energy": "captured energy",
    "stable_rank": "stable rank",
    "effective_rank": "effective rank",
    "spectral_norm": "s_1",
    "core_params": "core params",
    "pmb_params": "PMB params",
    "lora_params": "LoRA params",
}


def index_html(plan: Plan, grid: ModuleGrid, figures: dict[str, tuple[bytes, str]]) -> str:
    """Render the report page.

    Args:
        plan: the plan the report shows.
        grid: its module table (see :class:`ModuleGrid`).
        figures: PNG file name to ``(png_bytes, caption)``, in page order.

    Returns:
        The HTML text; it references no file or URL, so it can be mailed or opened offline.
    """
    model = plan.source.get("model_name") or "model"
    sections = [
        f"<h1>Spectra report: {html.escape(str(model))}</h1>",
        "<h2>Model</h2>",
        _key_value_table(_model_fields(plan)),
        "<h2>Settings</h2>",
        _key_value_table(plan.settings),
        "<h2>Totals</h2>",
        _totals_table(plan),
        "<h2>Module types</h2>",
        _types_table(grid),
        "<h2>Figures</h2>",
        *(_figure(name, png, caption) for name, (png, caption) in figures.items()),
        "<h2>Modules</h2>",
        "<p>Every column, including the singular values, is in modules.csv.</p>",
        f'<div class="scroll">{_module_table(grid)}</div>',
    ]
    body = "\n".join(sections)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(str(model))} spectra report</title>'
        f"<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _model_fields(plan: Plan) -> dict:
    fields = {key: value for key, value in plan.source.items() if value not in (None, "")}
    fields["weights fingerprint"] = plan.fingerprint
    fields["tool version"] = plan.tool_version or "unknown"
    return fields


def _key_value_table(fields: dict) -> str:
    rows = "".join(
        f'<tr><th class="text">{html.escape(str(key))}</th><td class="text">{html.escape(str(value))}</td></tr>'
        for key, value in fields.items()
    )
    return f"<table>{rows}</table>"


def _totals_table(plan: Plan) -> str:
    totals = plan.totals
    lamda = totals["core_params"] + totals["pmb_params"]
    lora = totals["lora_params"]
    rows = [
        ("modules", f"{totals['modules']:,}", ""),
        ("rank sum", f"{totals['rank_sum']:,}", "sum of r over modules"),
        ("trainable core parameters", f"{totals['core_params']:,}", "sum of r^2"),
        ("PMB parameters", f"{totals['pmb_params']:,}", "sum of r * d_out, trained until frozen"),
        ("core + PMB", f"{lamda:,}", f"{lamda / lora:.1%} of LoRA" if lora else ""),
        ("LoRA at the same ranks", f"{lora:,}", "sum of r * (d_in + d_out)"),
    ]
    cells = "".join(
        f'<tr><th class="text">{name}</th><td>{value}</td><td class="text">{html.escape(note)}</td></tr>'
        for name, value, note in rows
    )
    return f"<table>{cells}</table>"


def _types_table(grid: ModuleGrid) -> str:
    counts = grid.table.groupby("label", sort=False)["module"].count()
    cells = "".join(
        f'<tr><td class="text">{html.escape(label)}</td><td class="text">{html.escape(grid.types[label])}</td>'
        f"<td>{counts[label]}</td></tr>"
        for label in grid.columns
    )
    head = '<tr><th class="text">label</th><th class="text">path inside the layer</th><th>modules</th></tr>'
    return f"<table>{head}{cells}</table>"


def _figure(name: str, png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure id="{html.escape(name)}"><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
        f"<figcaption><b>{html.escape(name)}</b>: {html.escape(caption)}</figcaption></figure>"
    )


def _module_table(grid: ModuleGrid) -> str:
    frame = grid.table[list(_TABLE_COLUMNS)].rename(columns=_TABLE_COLUMNS)
    formatters = {
        column: (lambda value: "" if pd.isna(value) else f"{value:.4g}")
        for column in ("energy score", "captured energy", "stable rank", "effective rank", "s_1")
    }
    return frame.to_html(index=False, formatters=formatters, border=0, na_rep="")
