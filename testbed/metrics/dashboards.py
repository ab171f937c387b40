"""Reading the Grafana dashboards and checking them against a live Prometheus.

Owns walking ``grafana/dashboards/*.json`` (panels, nested rows, template
variables), the structural checks (unique panel ids, a datasource on every panel
and target, a known schemaVersion), substituting template variables the way
Grafana would, and running every panel query over Prometheus' HTTP API. This is
how the dashboards are proven without a Grafana: tests (and anyone with a running
monitor) call ``check_queries``. It leaves the dashboards' content to
``grafana/generate_dashboards.py``, the Prometheus process to ``testbed.metrics.monitor``
and finding the shipped folder to ``testbed.resources``.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from testbed import resources
from testbed.errors import TestbedError

# grafana/dashboards in a checkout, package data in an install (testbed.resources).
DASHBOARD_DIR = resources.folder("grafana") / "dashboards"
# Grafana 9.4 .. 11.x write these; older ones migrate, newer ones we have not seen.
SCHEMA_VERSIONS = range(36, 42)
# What Grafana substitutes for its built-in interval variables on a short range
# with a 1 s scrape interval; wide enough that a rate over it has two points.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", "__range_s": "3600"}
# Prefix of the series only a run with an Android phone has (testbed.metrics.phone).
PHONE_SERIES = "testbed_phone_"


@dataclass(frozen=True)
class PanelQuery:
    """One query of one panel."""

    dashboard: str
    panel_id: int
    panel: str
    ref_id: str
    expr: str


def load_dashboards(folder: Path | str = DASHBOARD_DIR) -> dict[str, dict]:
    """File name -> parsed dashboard, for every ``*.json`` in folder."""
    out = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            out[path.name] = json.loads(path.read_text())
        except ValueError as e:
            raise TestbedError(f"{path}: not JSON: {e}") from e
    return out


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict]:
    """Every panel, rows included, and the panels inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def queries(name: str, dashboard: Mapping[str, Any]) -> list[PanelQuery]:
    """Every PromQL expression in the dashboard's panels (rows have none)."""
    return [PanelQuery(name, p.get("id"), p.get("title", ""), t.get("refId", "?"), t["expr"])
            for p in panels(dashboard) for t in p.get("targets", []) if t.get("expr")]


def variable_queries(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """Template variable name -> its query text (``label_values(...)``)."""
    out = {}
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        out[var["name"]] = query.get("query", "") if isinstance(query, dict) else str(query or "")
    return out


def structure_problems(name: str, dashboard: Mapping[str, Any]) -> list[str]:
    """What is wrong with a dashboard's structure (empty list = fine)."""
    problems = []
    if dashboard.get("schemaVersion") not in SCHEMA_VERSIONS:
        problems.append(f"{name}: schemaVersion {dashboard.get('schemaVersion')!r} not in "
                        f"{SCHEMA_VERSIONS.start}..{SCHEMA_VERSIONS.stop - 1}")
    if not dashboard.get("uid") or not dashboard.get("title"):
        problems.append(f"{name}: needs uid and title")
    ids = [p.get("id") for p in panels(dashboard)]
    duplicates = sorted({i for i in ids if ids.count(i) > 1}, key=str)
    if duplicates or None in ids:
        problems.append(f"{name}: panel ids must be unique and present, duplicates {duplicates}")
    for panel in panels(dashboard):
        where = f"{name}: panel {panel.get('id')} {panel.get('title')!r}"
        if not _datasource_ok(panel.get("datasource")):
            problems.append(f"{where}: no datasource")
        if panel.get("type") != "row" and not panel.get("targets"):
            problems.append(f"{where}: no queries")
        for target in panel.get("targets", []):
            if not _datasource_ok(target.get("datasource", panel.get("datasource"))):
                problems.append(f"{where} {target.get('refId')}: no datasource")
    return problems


def _datasource_ok(ds: object) -> bool:
    return isinstance(ds, dict) and bool(ds.get("uid")) and bool(ds.get("type"))


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Replace ``$var`` / ``${var}`` / ``[[var]]`` as Grafana does (builtins included).

    Raises:
        TestbedError: a variable without a value remains.
    """
    merged = {**BUILTINS, **values}

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in merged:
            raise TestbedError(f"no value for ${name} in {expr!r}")
        return merged[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", repl, expr)


# --------------------------------------------------------------------------- Prometheus HTTP API

def api(url: str, endpoint: str, params: Mapping[str, Any] | list[tuple[str, str]]) -> Any:
    """GET ``url/api/v1/endpoint`` and return ``data``.

    Raises:
        TestbedError: Prometheus answered with an error (a query that does not parse ends here).
    """
    query = urllib.parse.urlencode(params, doseq=True)
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/api/v1/{endpoint}?{query}", timeout=10) as response:
            body = json.load(response)
    except urllib.error.HTTPError as e:
        try:
            body = json.load(e)
        except ValueError:
            raise TestbedError(f"prometheus {endpoint}: HTTP {e.code}") from e
    except OSError as e:
        raise TestbedError(f"prometheus at {url}: {e}") from e
    if body.get("status") != "success":
        raise TestbedError(f"prometheus {endpoint}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def instant(url: str, expr: str, at: float | None = None) -> list[dict]:
    """Run an instant query; returns the vector's elements (``metric``, ``value``)."""
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    data = api(url, "query", params)
    if data["resultType"] == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    return data["result"]


def label_values(url: str, query: str, at: float | None = None) -> list[str]:
    """Evaluate a Grafana ``label_values(selector, label)`` / ``label_values(label)`` query."""
    m = re.fullmatch(r"\s*label_values\(\s*(?:(.+?)\s*,\s*)?(\w+)\s*\)\s*", query)
    if not m:
        raise TestbedError(f"not a label_values query: {query!r}")
    selector, label = m.group(1), m.group(2)
    params: list[tuple[str, str]] = []
    if selector:
        params.append(("match[]", selector))
    if at is not None:
        params += [("start", f"{at - 3600:.3f}"), ("end", f"{at:.3f}")]
    return sorted(api(url, f"label/{label}/values", params))


def finite(result: list[dict]) -> list[dict]:
    """The elements of an instant result whose value is a finite number."""
    return [r for r in result if math.isfinite(float(r["value"][1]))]


def series_range(url: str, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
    """Run a range query; returns the matrix's series (``metric``, ``values``)."""
    data = api(url, "query_range", {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                    "step": f"{step:g}"})
    return data["result"]


def needs_phone(query: PanelQuery) -> bool:
    """True for the Android phone row's queries: they have data only in runs with a phone."""
    return PHONE_SERIES in query.expr


def check_queries(url: str, values: Mapping[str, str], at: float | None = None, start: float | None = None,
                  folder: Path | str = DASHBOARD_DIR,
                  select: Callable[[PanelQuery], bool] | None = None) -> dict[PanelQuery, str]:
    """Run every panel query of every dashboard; return the ones that failed, with why.

    A query passes when Prometheus parses it and returns at least one finite
    value with the template variables set to ``values``. Instant (table)
    queries are evaluated at ``at`` (default now), as Grafana evaluates them at
    the end of the dashboard's time range. With ``start``, time-series queries
    are evaluated over ``[start, at]`` as Grafana draws them, so a finished
    run's panels are checked over the run's window (targets that went away at
    its end are stale afterwards). ``select`` keeps only the queries it is true
    for (a run without a phone has no phone series: ``lambda q: not needs_phone(q)``).
    """
    failed: dict[PanelQuery, str] = {}
    for name, dashboard in load_dashboards(folder).items():
        instants = {(p.get("id"), t.get("refId")) for p in panels(dashboard)
                    for t in p.get("targets", []) if t.get("instant")}
        for q in queries(name, dashboard):
            if select is not None and not select(q):
                continue
            expr = substitute(q.expr, values)
            try:
                if start is not None and (q.panel_id, q.ref_id) not in instants:
                    end = at if at is not None else time.time()
                    points = [v for series in series_range(url, expr, start, end) for v in series["values"]]
                    ok = any(math.isfinite(float(v[1])) for v in points)
                    if not ok:
                        failed[q] = f"no data in [{start:.0f}, {end:.0f}] ({len(points)} points, none finite)"
                    continue
                result = instant(url, expr, at)
            except TestbedError as e:
                failed[q] = str(e)
                continue
            if not finite(result):
                failed[q] = f"no data ({len(result)} series, none finite)"
    return failed
