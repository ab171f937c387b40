"""Checks a built report against its own CSVs and the run folder (shared by the
unit rendering tests and the integration test on a real smoke run)."""

from __future__ import annotations

import base64
import csv
import io
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from testbed.analysis.results import read_csv


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict[str, Any]] = {}
        self.images: dict[str, bytes] = {}
        self._table: str | None = None
        self._row: list[str] | None = None
        self._figure: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table" and a.get("data-csv"):
            self._table = a["data-csv"]
            self.tables[self._table] = {"keys": (a.get("data-keys") or "").split(","), "rows": []}
        elif tag == "tr" and self._table:
            self._row = []
        elif tag == "td" and self._row is not None and "data-v" in a:
            self._row.append(a["data-v"] or "")
        elif tag == "figure":
            self._figure = (a.get("id") or "").removeprefix("fig-")
        elif tag == "img" and self._figure is not None:
            src = a.get("src") or ""
            assert src.startswith("data:image/png;base64,"), f"figure {self._figure} is not embedded: {src[:40]}"
            self.images[self._figure] = base64.b64decode(src.split(",", 1)[1])

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr" and self._row is not None:
            if self._row:
                self.tables[self._table]["rows"].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "figure":
            self._figure = None


def parse_report(html_path: Path) -> _Parser:
    p = _Parser()
    p.feed(html_path.read_text(encoding="utf-8"))
    return p


def png_is_a_real_picture(data: bytes, name: str) -> None:
    img = Image.open(io.BytesIO(data))
    img.load()
    arr = np.asarray(img.convert("L"), dtype=float)
    assert arr.shape[0] > 100 and arr.shape[1] > 100, f"{name}: {arr.shape} is too small to be a figure"
    # A blank or single-colour image has ~0 variance; a plot with axes, text and lines has plenty.
    assert arr.std() > 5, f"{name}: looks blank (pixel std {arr.std():.2f})"
    assert (arr < 128).mean() > 0.003, f"{name}: almost no dark pixels (no text, axes or lines)"


def check_report(report: Any, expected_figures: set[str]) -> _Parser:
    """Every figure exists, is a real picture and is embedded byte for byte;
    every HTML table row equals its CSV row."""
    parsed = parse_report(report.html_path)
    assert expected_figures <= set(report.figures), f"missing figures: {expected_figures - set(report.figures)}"
    for name, path in report.figures.items():
        assert path.is_file() and path.stat().st_size > 0, f"{path} missing or empty"
        png_is_a_real_picture(path.read_bytes(), name)
        assert parsed.images.get(name) == path.read_bytes(), f"{name}.png not embedded as written"
    assert set(parsed.tables) == {p.name for p in report.tables.values()}, "an HTML table without its CSV"
    for csv_name, t in parsed.tables.items():
        with (report.html_path.parent / csv_name).open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        assert rows[0] == t["keys"], f"{csv_name}: header differs from the HTML table"
        assert rows[1:] == t["rows"], f"{csv_name}: rows differ from the HTML table"
    return parsed


def check_tables_against_run(report: Any, run_dir: Path) -> None:
    """The report's tables say what the run's files say."""
    summary = read_csv(run_dir / "summary.csv")
    best = read_csv(report.tables["best_split"])
    profiles = {r["profile"] for r in summary}
    assert {r["profile"] for r in best} == profiles
    for b in best:
        rows = [r for r in summary if r["profile"] == b["profile"]]
        want = min(rows, key=lambda r: (r["e2e_p50_s"], -r["split"]))
        assert int(b["best_split"]) == want["split"]
        assert b["e2e_p50_s"] == want["e2e_p50_s"] and b["e2e_p90_s"] == want["e2e_p90_s"]
        for name, k in (("network", 0), ("device", max(r["split"] for r in rows))):
            anchor = next((r for r in rows if r["split"] == k), None)
            if anchor is not None and name == "network":
                assert b["network_anchor_p50_s"] == anchor["e2e_p50_s"]
                assert abs(b["speedup_vs_network"] - anchor["e2e_p50_s"] / want["e2e_p50_s"]) < 1e-9
    configs = read_csv(report.tables["configurations"])
    assert len(configs) == len(summary)
    by_key = {(r["profile"], r["split"]): r for r in summary}
    for c in configs:
        s = by_key[(c["profile"], int(c["split"]))]
        for col in ("e2e_p50_s", "e2e_p90_s", "e2e_mean_s", "head_mean_s", "uplink_mean_s", "tail_mean_s",
                    "cut_bytes_wire"):
            assert c[col] == s[col], f"configurations.csv {col} differs from summary.csv at {c['profile']}/{c['split']}"
    layers = read_csv(run_dir / "layers.csv")
    table = read_csv(report.tables["layer_profile"])
    for r in layers:
        row = next(t for t in table if int(t["layer"]) == r["layer"])
        assert row[f"{r['node']}_mean_s"] == r["mean_s"]
