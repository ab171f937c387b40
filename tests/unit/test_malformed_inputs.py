"""A corpus of malformed inputs: each is one error line, exit 1, and nothing created.

Every case goes through the real CLI (typer's CliRunner; the YAML bombs also
through a subprocess of the ``testbed`` console script): ``testbed run`` and
``testbed check`` for experiments, and ``testbed netem validate`` as well for
profiles and Mahimahi traces (referenced from an otherwise valid experiment).
"Nothing created" is checked with the system tools before and after each
command: no file or folder appears beside the experiment (no run folder), and
``ip netns list``, ``docker ps`` and ``tc qdisc show`` show no namespace,
container or testbed qdisc that this process (or its child) owns. Other
engineers' runs on this machine may create their own meanwhile: those carry
another owner tag and are ignored.

Cases are generated here (bombs, FIFOs, bad bytes cannot live in the repository
as files). A case is ``(id, kind, builder, expected words)``; the builder
writes the input into a folder and returns what the command is given.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from typer.testing import CliRunner

from testbed.cli import app

pytestmark = pytest.mark.unit

# --------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, str]:
    """A one-convolution NHWC model: profile and trace cases load a model, quickly."""
    from testbed.model.builder import ModelBuilder

    b = ModelBuilder("malformed-corpus tiny")
    x = b.input("img", (1, 8, 8, 3))
    w = np.random.default_rng(0).uniform(-1, 1, (4, 3, 3, 3)).astype(np.float32)
    b.output(b.conv2d(x, b.const("w", w), b.const("b", np.zeros(4, np.float32)), "out", (1, 8, 8, 4)))
    data = b.build()
    path = tmp_path_factory.mktemp("tiny") / "tiny.tflite"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


EXP = "name: e\nmodel: {builtin: posenet}\nnetwork: [ladder-10mbit]\nmetrics: {listen: '127.0.0.1:0'}\noutput: out\n"
PROFILE = "name: p\nsource: corpus\n"


def _laughs(levels: int = 9) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _text(name: str, text: str | bytes) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return path
    return build


def exp(text: str | bytes) -> Callable[[Path], Path]:
    return _text("exp.yaml", text)


def exp_with(setup: Callable[[Path], str], head: str = EXP) -> Callable[[Path], Path]:
    """An experiment whose extra lines need something made first (a FIFO, a folder)."""
    def build(folder: Path) -> Path:
        path = folder / "exp.yaml"
        path.write_text(head + setup(folder))
        return path
    return build


def fifo(folder: Path, name: str) -> Path:
    path = folder / name
    os.mkfifo(path)
    return path


def _pixel_bomb(folder: Path) -> Path:
    """A 1x1 PNG whose header claims 10,000 x 10,000 pixels."""
    from tests.unit.test_inputs import _png_claiming

    folder.mkdir()
    return _png_claiming(folder, 10_000, 10_000)


def prof(body: str | bytes, head: str = PROFILE) -> Callable[[Path], Path]:
    return _text("p.yaml", (head.encode() + body) if isinstance(body, bytes) else head + body)


def trace(lines: str | bytes | None, window: str = "500ms") -> Callable[[Path], Path]:
    """A profile driving the uplink from ``t.up`` (None: t.up is a FIFO)."""
    def build(folder: Path) -> Path:
        if lines is None:
            fifo(folder, "t.up")
        else:
            (folder / "t.up").write_bytes(lines if isinstance(lines, bytes) else lines.encode())
        path = folder / "p.yaml"
        path.write_text(PROFILE + f"uplink: {{rate: 10mbit}}\ntrace: {{mahimahi: t.up, window: {window}}}\n")
        return path
    return build


def trace_at(target: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / "p.yaml"
        path.write_text(PROFILE + f"uplink: {{rate: 10mbit}}\ntrace: {{mahimahi: '{target}'}}\n")
        return path
    return build


CASES: list[tuple[str, str, Callable[[Path], Path], str]] = [
    # --- experiments: YAML itself
    ("billion-laughs", "experiment", exp(EXP + _laughs()), "more than 100000 values"),
    ("self-alias", "experiment", exp(EXP + "x: &a [*a]\n"), "recursive structure"),
    ("nesting-5000", "experiment", exp(EXP + "x: " + "[" * 5000 + "]" * 5000 + "\n"), "nested deeper than 32"),
    ("complex-key", "experiment", exp(EXP + "? [a, b]\n: 1\n"), "complex"),
    ("merge-key", "experiment", exp(EXP + "runs: {<<: {samples: 3}}\n"), "merge keys"),
    ("bad-utf8", "experiment", exp(EXP.encode() + b"description: caf\xe9\n"), "not UTF-8"),
    ("too-large", "experiment", exp(EXP + "#" * (1 << 20) + "\n"), "at most 1048576 bytes"),
    ("control-char", "experiment", exp(EXP + "description: a\x07b\n"), "not valid YAML"),
    ("set-tag", "experiment", exp(EXP + "runs: !!set {a: null}\n"), "unsupported YAML tag"),
    ("python-tag", "experiment", exp(EXP + "description: !!python/object/apply:os.system ['true']\n"),
     "unsupported YAML tag"),
    ("python-scalar-tag", "experiment", exp(EXP + "description: !!python/name:os.system ''\n"), "not valid YAML"),
    ("bad-int-tag", "experiment", exp(EXP + "runs: {samples: !!int 0x}\n"), "cannot read '0x' as int"),
    ("two-documents", "experiment", exp(EXP + "---\nname: f\n"), "not valid YAML"),
    ("duplicate-key", "experiment", exp(EXP + "name: f\n"), "duplicate key"),
    ("not-a-mapping", "experiment", exp("- name: e\n"), "expected a mapping"),
    ("markup-in-value", "experiment", exp(EXP.replace("name: e", "name: '[/red]x'")), "[/red]x"),
    # --- experiments: values
    ("max-seconds-nan", "experiment", exp(EXP + "runs: {max_seconds: .nan}\n"), "finite"),
    ("max-seconds-inf", "experiment", exp(EXP + "runs: {max_seconds: .inf}\n"), "finite"),
    ("max-seconds-huge", "experiment", exp(EXP + "runs: {max_seconds: 1e9s}\n"), "less than or equal to 86400"),
    ("min-over-max", "experiment", exp(EXP + "runs: {min_seconds: 9s, max_seconds: 1s}\n"), "exceeds max_seconds"),
    ("samples-zero", "experiment", exp(EXP + "runs: {samples: 0}\n"), "greater than or equal to 1"),
    ("warmup-yes", "experiment", exp(EXP + "runs: {warmup: yes}\n"), "valid integer"),
    ("cpus-inf", "experiment", exp(EXP + "nodes: {local: {cpus: .inf}}\n"), "finite"),
    ("threads-true", "experiment", exp(EXP + "nodes: {local: {threads: true}}\n"), "valid integer"),
    ("memory-1e400", "experiment", exp(EXP + "nodes: {local: {memory: 1e400}}\n"), "finite"),
    ("memory-tiny", "experiment", exp(EXP + "nodes: {remote: {memory: 1MiB}}\n"), "below 64MiB"),
    ("splits-1e20", "experiment", exp(EXP + "splits: 0-1e20\n"), "range such as '0-5'"),
    ("splits-huge", "experiment", exp(EXP + "splits: 0-100000000000000000000\n"), "within 0 and 100000"),
    ("seed-negative", "experiment", exp(EXP + "input: {seed: -1}\n"), "greater than or equal to 0"),
    ("model-seed-huge", "experiment", exp(EXP.replace("posenet}", "posenet, seed: 1" + "0" * 30 + "}")),
     "less than or equal to 4294967295"),
    ("network-nul", "experiment", exp(EXP.replace("[ladder-10mbit]", '["a\\0b"]')), "NUL byte"),
    ("network-long", "experiment", exp(EXP.replace("ladder-10mbit", "a" * 5000)), "at most 4096 characters"),
    ("network-empty", "experiment", exp(EXP.replace("[ladder-10mbit]", "[]")), "at least 1"),
    ("network-devzero", "experiment", exp(EXP.replace("ladder-10mbit", "/dev/zero")), "a character device"),
    ("network-fifo", "experiment", exp_with(lambda f: f"network: ['{fifo(f, 'p.yaml')}']\n",
                                            EXP.replace("network: [ladder-10mbit]\n", "")), "a FIFO"),
    ("pushgateway", "experiment", exp(EXP.replace("listen: '127.0.0.1:0'}", "listen: '127.0.0.1:0', "
                                                  "pushgateway: 'ftp://x'}")), "expected a URL"),
    ("output-nul", "experiment", exp(EXP.replace("output: out", 'output: "o\\0"')), "NUL byte"),
    # model paths, through experiment loading (models themselves: see the model tests)
    ("model-fifo", "experiment", exp_with(lambda f: "model: {path: '%s', sha256: %s}\n" % (fifo(f, "m.tflite"), "a" * 64),
                                          EXP.replace("model: {builtin: posenet}\n", "")), "a FIFO"),
    ("model-devzero", "experiment", exp(EXP.replace("{builtin: posenet}", "{path: /dev/zero, sha256: %s}" % ("a" * 64))),
     "a character device"),
    ("model-missing", "experiment", exp(EXP.replace("{builtin: posenet}", "{path: no.tflite, sha256: %s}" % ("a" * 64))),
     "no such model file"),
    ("input-count-frame", "experiment", exp(EXP + "input: {count: 1000}\n"), "at most 527 for this model"),
    ("input-pixel-bomb", "experiment", exp_with(lambda f: _pixel_bomb(f / "imgs") and "input: {source: imgs}\n"),
     "at most 64000000 are decoded"),
    ("input-fifo-image", "experiment", exp_with(lambda f: (f / "imgs").mkdir() or fifo(f / "imgs", "a.png") and
                                                "input: {source: imgs}\n"), "a FIFO"),
    # --- profiles (netem validate; run and check through an experiment naming p.yaml)
    ("rate-1e30tbit", "profile", prof("uplink: {rate: 1e30tbit}\n"), "within 64bit and 34.35973836gbit"),
    ("rate-inf", "profile", prof("uplink: {rate: .inf}\n"), "finite"),
    ("rate-1bit", "profile", prof("uplink: {rate: 1bit}\n"), "within 64bit"),
    ("delay-nan", "profile", prof("uplink: {rate: 1mbit, delay: .nan}\n"), "finite"),
    ("delay-1e12s", "profile", prof("uplink: {rate: 1mbit, delay: 1e12s}\n"), "within 0s and 3600s"),
    ("jitter-3s", "profile", prof("uplink: {delay: 5s, jitter: 3s}\n"), "2^31-1 ns"),
    ("limit-2^40", "profile", prof("uplink: {rate: 1mbit, limit: 1099511627776}\n"), "within 1 and 2863311"),
    ("limit-alone", "profile", prof("uplink: {limit: 100}\n"), "give rate"),
    ("slot-1e15s", "profile", prof("uplink: {delay: 1ms, slot: {min_delay: 1e15s}}\n"), "within 0s and 3600s"),
    ("slot-packets", "profile", prof("uplink: {delay: 1ms, slot: {min_delay: 1ms, packets: 4294967296}}\n"),
     "2147483647"),
    ("overhead-negative", "profile", prof("uplink: {rate: 1mbit, overhead: -14}\n"), "within 0 and 1024"),
    ("gap-true", "profile", prof("uplink: {delay: 1ms, reorder: {percent: 1%, gap: true}}\n"), "valid integer"),
    ("percent-over", "profile", prof("uplink: {loss: 101%}\n"), "within 0% and 100%"),
    ("rate-bps", "profile", prof("uplink: {rate: 10mbps}\n"), "ambiguous rate unit"),
    ("name-unsafe", "profile", prof("uplink: {rate: 1mbit}\n", "name: 'a b/c'\nsource: corpus\n"), "pattern"),
    ("step-empty", "profile", prof("trace: {steps: [{at: 0s}]}\n"), "nothing to shape"),
    ("window-1ns", "profile", prof("trace: {window: 1ns, steps: [{at: 0s, rate: 1mbit}]}\n"), "window must be within"),
    ("profile-laughs", "profile", prof(_laughs()), "more than 100000 values"),
    ("profile-bad-utf8", "profile", prof(b"description: \xff\xfe\n"), "not UTF-8"),
    # --- Mahimahi traces
    ("trace-huge-timestamp", "trace", trace("0\n" + "9" * 5000 + "\n"), "expected a millisecond timestamp"),
    ("trace-late-timestamp", "trace", trace("0\n99999999999\n"), "is beyond 604800000 ms"),
    ("trace-backwards", "trace", trace("5\n3\n"), "must not go backwards"),
    ("trace-empty", "trace", trace("\n\n"), "no timestamps"),
    ("trace-binary", "trace", trace(b"\x00\xff\x01\n"), "expected a millisecond timestamp"),
    ("trace-too-many-windows", "trace", trace("0\n600000000\n", window="10ms"), "windows"),
    ("trace-too-fast", "trace", trace("0\n" * 40_000 + "5\n", window="10ms"), "gives rate must be within"),
    ("trace-fifo", "trace", trace(None), "a FIFO"),
    ("trace-devzero", "trace", trace_at("/dev/zero"), "a character device"),
]

# --------------------------------------------------------------------------- nothing created


def _lines(argv: list[str]) -> list[str]:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return r.stdout.splitlines() if r.returncode == 0 else []


def _owned_by(tag: str, pids: set[int]) -> bool:
    return tag.partition(":")[0] in {str(p) for p in pids}


def _system(pids: set[int]) -> set[str]:
    """What this process (or its children) owns, seen through the system tools."""
    from testbed.deploy import netns as ns
    from testbed.link import state

    found = set()
    owners = ns.run_owners()
    for line in _lines(["ip", "netns", "list"]):
        name = line.split()[0] if line.split() else ""
        run = name[len("testbed-"):].rsplit("-", 1)[0] if name.startswith("testbed-") else None
        if run is not None and _owned_by(owners.get(run, ""), pids):
            found.add(f"netns {name}")
    if shutil.which("docker"):
        for line in _lines(["docker", "ps", "-a", "--filter", "label=testbed.run",
                            "--format", '{{.ID}} {{.Label "testbed.owner"}}']):
            cid, _, tag = line.partition(" ")
            if _owned_by(tag, pids):
                found.add(f"container {cid}")
    for target, record in state.records(state.state_dir()):
        if record.get("pid") in pids:
            found.add(f"qdisc record {target}")
    return found


def _host_testbed_qdiscs() -> set[str]:
    """Host-namespace qdiscs with the shaper's handle (7462:) — none may appear."""
    return {line for line in _lines(["tc", "qdisc", "show"]) if " 7462:" in line or " 7463:" in line}


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# --------------------------------------------------------------------------- the tests


def _experiment_for(kind: str, path: Path, folder: Path, tiny: tuple[Path, str]) -> Path:
    """The experiment file ``run``/``check`` get: the case itself, or one naming the profile."""
    if kind == "experiment":
        return path
    model, sha = tiny
    exp_path = folder / "exp.yaml"
    exp_path.write_text(f"name: e\nmodel: {{path: '{model}', sha256: {sha}}}\nnetwork: [p.yaml]\n"
                        "metrics: {listen: '127.0.0.1:0'}\noutput: out\n")
    return exp_path


def _commands(kind: str, case_file: Path, exp_file: Path) -> list[list[str]]:
    out = [["run", str(exp_file)], ["check", str(exp_file)]]
    if kind != "experiment":
        out.append(["netem", "validate", str(case_file)])
    return out


def _assert_one_line(result, words: str, what: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1, f"{what}: exit {result.exit_code}\n{result.output}"
    assert len(lines) == 1, f"{what}: {len(lines)} lines on stderr:\n{result.stderr}"
    assert lines[0].startswith("error: ") and words in lines[0], f"{what}: {lines[0]!r}"
    assert "Traceback" not in result.output


def test_the_corpus_is_big_enough():
    kinds = {kind for _, kind, _, _ in CASES}
    assert len(CASES) >= 40 and kinds == {"experiment", "profile", "trace"}
    assert len({case_id for case_id, *_ in CASES}) == len(CASES)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case_id,kind,build,words", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_one_line_exit_1_and_nothing_created(tmp_path, tiny_model, case_id, kind, build, words):
    case_file = build(tmp_path)
    exp_file = _experiment_for(kind, case_file, tmp_path, tiny_model)
    runner = CliRunner()
    pids = {os.getpid()}
    for argv in _commands(kind, case_file, exp_file):
        tree, system, qdiscs = _tree(tmp_path), _system(pids), _host_testbed_qdiscs()
        result = runner.invoke(app, argv)
        _assert_one_line(result, words, f"{case_id}: testbed {argv[0]}")
        assert _tree(tmp_path) == tree, f"{case_id}: testbed {argv[0]} created files"
        assert _system(pids) == system and _host_testbed_qdiscs() <= qdiscs, f"{case_id}: {argv[0]} created state"
        assert not (tmp_path / "out").exists()


BOMBS = ["billion-laughs", "self-alias", "nesting-5000", "too-large", "profile-laughs", "trace-fifo",
         "network-devzero", "trace-huge-timestamp"]


@pytest.mark.timeout(600)   # "finishes": before the fix the laughs ran past 60 s at 1.2 GB, the FIFO forever
@pytest.mark.parametrize("case_id", BOMBS)
def test_bombs_finish_through_the_real_cli(tmp_path, tiny_model, case_id):
    _, kind, build, words = next(c for c in CASES if c[0] == case_id)
    case_file = build(tmp_path)
    exp_file = _experiment_for(kind, case_file, tmp_path, tiny_model)
    testbed = Path(sys.executable).with_name("testbed")
    for argv in _commands(kind, case_file, exp_file):
        tree = _tree(tmp_path)
        proc = subprocess.Popen([str(testbed), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=tmp_path)
        out, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 1 and len(lines) == 1 and words in lines[0], (argv, err)
        assert _system({proc.pid}) == set() and _tree(tmp_path) == tree
