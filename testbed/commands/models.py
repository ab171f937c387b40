"""``testbed models build|fetch|add|list``: the model zoo from the command line (thin)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from testbed.model import zoo
from testbed.units import format_bytes

app = typer.Typer(help="Build, fetch, register and list models.\n\n"
                       "Example: testbed models build posenet --out posenet.tflite",
                  no_args_is_help=True)


@app.command("build")
def build(name: Annotated[str, typer.Argument(help="built-in model name (posenet)")],
          out: Annotated[Path, typer.Option("--out", "-o", help="file to write")],
          seed: Annotated[int, typer.Option("--seed", help="weight seed: same seed, same bytes")] = 0,
          scheme: Annotated[str, typer.Option(
              "--scheme", help="float32 | float16 | dynamic | int8 | uint8 | int16x8 "
                               "(TFLite's quantization schemes; float32 is the pinned built-in)")] = "float32") -> None:
    """Write a built-in model (TFLite, seeded weights, no download), float32 or quantized.

    Example: testbed models build posenet --out posenet_fp16.tflite --scheme float16
    """
    data = zoo.build_builtin(name, seed, scheme)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    typer.echo(f"{out}  {len(data)} bytes  sha256 {hashlib.sha256(data).hexdigest()}")


@app.command("fetch")
def fetch(name: Annotated[str, typer.Argument(help="official model name (posenet)")] = "posenet",
          dest: Annotated[Path | None, typer.Option(
              "--dest", help="directory to download into (default: the cache)")] = None) -> None:
    """Download the official model, verify its pinned sha256 and register it.

    Example: testbed models fetch posenet --dest models/
    """
    e = zoo.fetch(name, dest=dest)
    note = "" if e["verified"] else " (no pinned checksum: recorded, not verified)"
    typer.echo(f"{e['name']}: {e['path']}  {e['bytes']} bytes  sha256 {e['sha256']}{note}")


@app.command("add")
def add(name: Annotated[str, typer.Argument(help="name to register under")],
        path: Annotated[Path, typer.Argument(help="a TFLite file")]) -> None:
    """Register a TFLite file (e.g. one fetched by hand) under NAME.

    Example: testbed models add posenet ~/Downloads/posenet_mobilenet_v1_100_257x257_multi_kpt_stripped.tflite
    """
    e = zoo.add(name, path)
    typer.echo(f"{e['name']}: {e['path']}  {e['bytes']} bytes  sha256 {e['sha256']}")


@app.command("list")
def list_(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Show built-in and registered models with sizes and checksums.

    Example: testbed models list --json
    """
    rows = zoo.list_models()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("name", "source", "size", "sha256", "path")
    for r in rows:
        table.add_row(r["name"], r["source"], format_bytes(r["bytes"]) if r["bytes"] is not None else "?",
                      (r["sha256"] or "?")[:16] + "…", r["path"] or "(built on use)")
    Console().print(table)
