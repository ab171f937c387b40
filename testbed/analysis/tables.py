"""The report's tables: columns with a kind, rows of base-unit values, and the two ways a
value is written (CSV cell, what a reader sees). One definition for every section
(``report``, ``data_path_report``), so a value in the HTML is the value in the CSV.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.units import format_bytes, format_rate


@dataclass
class Column:
    key: str
    title: str
    kind: str = "text"  # text | int | ms | bytes | rate | ratio | pct


@dataclass
class Table:
    name: str           # file stem of the CSV, id of the HTML table
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]]
    note: str = ""
    collapsed: bool = False


def csv_cell(value: Any) -> str:
    """How a value is written to a table CSV (and carried in the HTML's ``data-v``)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def display(value: Any, kind: str) -> str:
    """How a value is shown to a reader."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if kind == "ms":
        return f"{value * 1e3:.3g} ms" if abs(value) < 1 else f"{value:.3g} s"
    if kind == "bytes":
        return format_bytes(value)
    if kind == "rate":
        return format_rate(value)
    if kind == "ratio":
        return f"{value:.2f}×"
    if kind == "pct":
        return f"{value:+.1f} %"
    if kind == "int":
        return f"{int(value)}"
    if kind == "float":
        return f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_csv(table: Table, out: Path) -> Path:
    path = out / f"{table.name}.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow([c.key for c in table.columns])
        for r in table.rows:
            w.writerow([csv_cell(r.get(c.key)) for c in table.columns])
    return path
