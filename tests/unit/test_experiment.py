"""Experiment schema: every mistake is one error naming file, line and field."""

from pathlib import Path

import pytest

from testbed.errors import ConfigError
from testbed.experiment import load_experiment, parse_host_port, parse_splits, resolved_dict

pytestmark = pytest.mark.unit

HEAD = "name: t\nmodel: {builtin: posenet}\nnetwork: [ladder-10mbit]\n"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return p


def _error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_experiment(_write(tmp_path, text))
    return info.value


def test_valid_file_gives_base_units_and_defaults(tmp_path):
    e = load_experiment(_write(tmp_path, HEAD + "nodes:\n  local: {cpus: 1, memory: 1GiB, threads: 1}\n"
                                         "runs: {warmup: 1, samples: 5, max_seconds: 2500ms}\n"))
    assert e.nodes.local.memory == 2**30 and e.nodes.local.cpus == 1.0
    assert e.runs.max_seconds == pytest.approx(2.5)
    assert e.metrics.listen == "127.0.0.1:9400" and e.codec == "raw" and e.input.synthetic
    assert e.split_points(31) == list(range(32))


def test_unknown_key_names_its_line(tmp_path):
    e = _error(tmp_path, HEAD + "runs:\n  warmup: 1\n  sampels: 5\n")
    assert (e.line, e.field) == (6, "runs.sampels") and "unknown field" in str(e)
    assert str(e).startswith(f"{tmp_path / 'exp.yaml'}:6: runs.sampels:")


def test_backwards_split_range_is_refused_at_its_line(tmp_path):
    e = _error(tmp_path, HEAD + "splits: [0, '9-3']\n")
    assert (e.line, e.field) == (4, "splits") and "backwards" in str(e)


def test_garbage_split_is_refused(tmp_path):
    e = _error(tmp_path, HEAD + "splits: 'a-b'\n")
    assert e.line == 4 and "range such as '0-5'" in str(e)


def test_split_beyond_the_model_is_refused_once_layers_are_known(tmp_path):
    e = load_experiment(_write(tmp_path, HEAD + "splits: '0-2,30-33'\n"))
    with pytest.raises(ConfigError) as info:
        e.split_points(31)
    assert info.value.line == 4 and "beyond" in str(info.value)


def test_split_lists_and_ranges_expand_sorted_and_unique(tmp_path):
    e = load_experiment(_write(tmp_path, HEAD + "splits: [31, '0-2', 1, '5,7']\n"))
    assert e.split_points(31) == [0, 1, 2, 5, 7, 31]
    assert parse_splits("all") == [] and parse_splits(3) == [(3, 3)]


@pytest.mark.parametrize("text, field, words", [
    ("model: {path: m.tflite}\n", "model", "sha256"),
    ("model: {builtin: posenet, fetch: posenet}\n", "model", "exactly one"),
    ("model: {builtin: resnet}\n", "model.builtin", "posenet"),
    ("model: {builtin: posenet, scheme: int4}\n", "model.scheme", "float16"),
    ("model: {fetch: posenet, scheme: float16}\n", "model", "scheme belongs to builtin"),
    ("model: {path: m.tflite, sha256: xyz}\n", "model.sha256", "64 hexadecimal"),
])
def test_model_source_rules(tmp_path, text, field, words):
    e = _error(tmp_path, "name: t\nnetwork: [x]\n" + text)
    assert e.line == 3 and e.field == field and words in str(e)


def test_model_path_with_checksum_resolves_relative_to_the_experiment(tmp_path):
    (tmp_path / "m.tflite").write_bytes(b"x")
    e = load_experiment(_write(tmp_path, "name: t\nnetwork: [x]\nmodel: {path: m.tflite, sha256: " + "a" * 64 + "}\n"))
    assert resolved_dict(e)["model"]["path"] == str(tmp_path / "m.tflite")


def test_missing_model_file_is_named(tmp_path):
    e = _error(tmp_path, "name: t\nnetwork: [x]\nmodel: {path: nope.tflite, sha256: " + "a" * 64 + "}\n")
    assert e.field == "model.path" and "no such model file" in str(e)


@pytest.mark.parametrize("text, line, field", [
    ("nodes:\n  local: {cpus: 0}\n", 5, "nodes.local.cpus"),
    ("nodes:\n  local: {memory: 10mbit}\n", 5, "nodes.local.memory"),
    ("nodes:\n  local: {backend: docker}\n  remote: {backend: netns}\n", 4, "nodes"),
    ("runs: {min_seconds: 5s, max_seconds: 1s}\n", 4, "runs"),
    ("runs: {samples: 0}\n", 4, "runs.samples"),
    ("input_encoding: webp\n", 4, "input_encoding"),
    ("codec: gzip\n", 4, "codec"),
    ("metrics: {listen: 'localhost'}\n", 4, "metrics.listen"),
    ("input: {source: /no/such/folder}\n", 4, "input.source"),
])
def test_field_errors(tmp_path, text, line, field):
    e = _error(tmp_path, HEAD + text)
    assert (e.line, e.field) == (line, field)


def test_network_needs_a_profile_and_no_duplicates(tmp_path):
    assert _error(tmp_path, "name: t\nmodel: {builtin: posenet}\nnetwork: []\n").field == "network"
    e = _error(tmp_path, "name: t\nmodel: {builtin: posenet}\nnetwork: [a, a]\n")
    assert "twice" in str(e)


def test_profile_refs_files_resolve_names_stay(tmp_path):
    e = load_experiment(_write(tmp_path, "name: t\nmodel: {builtin: posenet}\nnetwork: [ladder-1mbit, my/p.yaml]\n"))
    assert e.profile_ref(0) == "ladder-1mbit"
    assert e.profile_ref(1) == str(tmp_path / "my/p.yaml")


def test_host_port():
    assert parse_host_port("0.0.0.0:0") == ("0.0.0.0", 0)
    assert parse_host_port("[::1]:9400") == ("::1", 9400)
    with pytest.raises(ValueError):
        parse_host_port("1.2.3.4:70000")


def test_shipped_experiments_validate():
    root = Path(__file__).resolve().parents[2] / "experiments"
    files = sorted(root.glob("*.yaml"))
    assert {"posenet_sweep.yaml", "posenet_5g.yaml", "smoke.yaml"} <= {f.name for f in files}
    for f in files:
        e = load_experiment(f)
        assert e.split_points(31)
        assert [p.name for p in e.load_profiles()]  # every named link profile exists and validates
    smoke = load_experiment(root / "smoke.yaml")
    assert {0, 31} <= set(smoke.split_points(31)) and len(smoke.network) == 1
    assert not any(p.needs_netem() for p in smoke.load_profiles())
    assert not any(p.needs_netem() for p in load_experiment(root / "posenet_sweep.yaml").load_profiles())
    assert load_experiment(root / "posenet_sweep.yaml").split_points(31) == list(range(32))


def test_unknown_profile_is_reported_at_its_network_line(tmp_path):
    e = load_experiment(_write(tmp_path, "name: t\nmodel: {builtin: posenet}\nnetwork:\n  - no-such-profile\n"))
    with pytest.raises(ConfigError) as info:
        e.load_profiles()
    assert (info.value.line, info.value.field) == (4, "network.0") and "no such link profile" in str(info.value)


def test_error_inside_a_profile_file_keeps_that_files_line(tmp_path):
    (tmp_path / "p.yaml").write_text("name: p\nsource: test\nuplink:\n  rate: 10mbps\n")
    e = load_experiment(_write(tmp_path, "name: t\nmodel: {builtin: posenet}\nnetwork: [p.yaml]\n"))
    with pytest.raises(ConfigError) as info:
        e.load_profiles()
    assert info.value.file.endswith("p.yaml") and info.value.line == 4


def test_two_profiles_with_one_name_are_refused(tmp_path):
    for f in ("a.yaml", "b.yaml"):
        (tmp_path / f).write_text("name: same\nsource: test\nuplink: {rate: 1mbit}\n")
    e = load_experiment(_write(tmp_path, "name: t\nmodel: {builtin: posenet}\nnetwork: [a.yaml, b.yaml]\n"))
    with pytest.raises(ConfigError, match="also the name") as info:
        e.load_profiles()
    assert info.value.field == "network.1"


def test_repeats_walk_a_shuffled_order_that_the_seed_reproduces(tmp_path):
    """runs.repeat > 1: every repeat covers every (profile, split) once, profile
    by profile (the link changes once per profile and repeat), in an order drawn
    from seed + repeat — the same seed gives the same order; one repeat keeps the
    file's order."""
    from types import SimpleNamespace

    from testbed.sweep import Plan

    def plan(repeat: int, seed: int) -> Plan:
        exp = SimpleNamespace(runs=SimpleNamespace(repeat=repeat))
        profiles = [SimpleNamespace(name=n) for n in ("a", "b", "c")]
        return Plan(exp, profiles, tmp_path, None, list(range(8)), seed=seed)

    one = [c.key for c in plan(1, 5).configurations]
    assert one == [(0, p, k) for p in "abc" for k in range(8)]
    three = [c.key for c in plan(3, 5).configurations]
    assert three == [c.key for c in plan(3, 5).configurations]
    assert three != [c.key for c in plan(3, 6).configurations]
    for r in range(3):
        keys = [(p, k) for rr, p, k in three if rr == r]
        assert sorted(keys) == sorted((p, k) for p in "abc" for k in range(8))
        profiles = [p for p, _ in keys]
        assert profiles == sorted(profiles, key=profiles.index)  # grouped: one link change per profile
    assert [k for _, _, k in three[:8]] != list(range(8)) or [k for _, _, k in three[8:16]] != list(range(8))


def test_pinning_and_repeat_keys(tmp_path):
    e = load_experiment(_write(tmp_path, HEAD + "nodes:\n  pinning: off\n  local: {cpus: 1, cpuset: '0-1'}\n"
                                         "runs: {repeat: 3, seed: 42}\n"))
    assert e.nodes.pinning == "off" and e.nodes.local.cpu_list == (0, 1) and e.nodes.remote.cpu_list is None
    assert (e.runs.repeat, e.runs.seed) == (3, 42)
    assert load_experiment(_write(tmp_path, HEAD)).runs.repeat == 1
    err = _error(tmp_path, HEAD + "nodes:\n  local:\n    cpuset: 'one'\n")
    assert (err.line, err.field) == (6, "nodes.local.cpuset") and "CPU numbers" in str(err)
    err = _error(tmp_path, HEAD + "runs: {repeat: 0}\n")
    assert err.field == "runs.repeat"
    err = _error(tmp_path, HEAD + "nodes: {pinning: sometimes}\n")
    assert err.field == "nodes.pinning"


# --- bounds: no absurd value reaches the sweep ------------------------------------------------------

@pytest.mark.parametrize("text, field, words", [
    ("runs: {max_seconds: .nan}\n", "runs.max_seconds", "finite"),
    ("runs: {max_seconds: .inf}\n", "runs.max_seconds", "finite"),
    ("runs: {max_seconds: 2d}\n", "runs.max_seconds", "unknown time unit"),
    ("runs: {max_seconds: 100000s}\n", "runs.max_seconds", "less than or equal to 86400"),
    ("runs: {warmup: true}\n", "runs.warmup", "valid integer"),
    ("runs: {samples: 2.5}\n", "runs.samples", "valid integer"),
    ("nodes: {local: {cpus: .inf}}\n", "nodes.local.cpus", "finite"),
    ("nodes: {local: {cpus: 0.001}}\n", "nodes.local.cpus", "greater than or equal to 0.01"),
    ("nodes: {local: {cpus: true}}\n", "nodes.local.cpus", "valid number"),
    ("nodes: {local: {threads: true}}\n", "nodes.local.threads", "valid integer"),
    ("nodes: {local: {memory: 1e400}}\n", "nodes.local.memory", "finite"),
    ("nodes: {local: {memory: 1e30GiB}}\n", "nodes.local.memory", "less than or equal"),
    ("splits: 0-100000000000000000000\n", "splits", "within 0 and 100000"),
    ("splits: [0, 200000]\n", "splits", "within 0 and 100000"),
    ("splits: ['0-" + "9" * 5000 + "']\n", "splits", "within 0 and 100000"),
    ("splits: [true]\n", "splits", "split point"),
    ("splits: 0-1e20\n", "splits", "range such as"),
    ("input: {seed: -1}\n", "input.seed", "greater than or equal to 0"),
    ("input: {seed: 99999999999}\n", "input.seed", "less than or equal to 4294967295"),
    ("input: {source: \"a\\0b\"}\n", "input.source", "NUL"),
    ("output: \"a\\0b\"\n", "output", "NUL"),
    ("output: ''\n", "output", "empty"),
    ("metrics: {listen: \"a\\0b:1\"}\n", "metrics.listen", "HOST:PORT"),
])
def test_absurd_values_are_refused_at_their_line(tmp_path, text, field, words):
    e = _error(tmp_path, HEAD + text)
    assert e.field == field and e.line == 4 and words in e.reason, str(e)


def test_seed_of_the_builtin_model_is_bounded(tmp_path):
    e = _error(tmp_path, "name: t\nnetwork: [x]\nmodel: {builtin: posenet, seed: 1" + "0" * 40 + "}\n")
    assert e.field == "model.seed" and "less than or equal" in e.reason


@pytest.mark.parametrize("kind", ["fifo", "dev", "folder"])
def test_model_file_must_be_a_regular_file(tmp_path, kind):
    import os

    path = {"fifo": tmp_path / "m.tflite", "dev": Path("/dev/zero"), "folder": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    e = _error(tmp_path, f"name: t\nnetwork: [x]\nmodel: {{path: '{path}', sha256: {'a' * 64}}}\n")
    assert e.field == "model.path" and "must be a regular file" in e.reason


def test_input_images_must_be_regular_files(tmp_path):
    import os

    folder = tmp_path / "imgs"
    folder.mkdir()
    os.mkfifo(folder / "a.png")                      # Pillow would block on it
    e = _error(tmp_path, HEAD + "input: {source: imgs}\n")
    assert e.field == "input.source" and "a FIFO" in e.reason
    (folder / "a.png").unlink()
    e = _error(tmp_path, HEAD + "input: {source: imgs}\n")
    assert e.field == "input.source" and "no images" in e.reason


def test_a_relative_model_path_resolves_against_the_experiment_not_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "m.tflite").write_bytes(b"x")
    e = load_experiment(_write(tmp_path, "name: t\nnetwork: [x]\nmodel: {path: m.tflite, sha256: " + "a" * 64 + "}\n"))
    monkeypatch.chdir("/")
    assert e.model.as_spec()["path"] == str(tmp_path / "m.tflite")


def test_builtin_scheme_reaches_the_zoo(tmp_path, monkeypatch):
    from testbed.model.graph import ModelGraph
    from testbed.model.zoo import resolve
    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path / "cache"))
    e = load_experiment(_write(tmp_path, "name: t\nnetwork: [x]\nmodel: {builtin: posenet, scheme: float16}\n"))
    assert e.model.as_spec() == {"builtin": "posenet", "scheme": "float16"}
    g = ModelGraph.from_file(resolve(e.model.as_spec()))
    assert g.num_layers == 31 and len(g.folded) == 62
