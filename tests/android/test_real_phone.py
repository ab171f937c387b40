"""The same path on a real phone: run when TESTBED_ANDROID_SERIAL (and TESTBED_BENCHMARK_MODEL, the
host path of TFLite's Android benchmark binary) are set. Never the only test of a behaviour: every
check here also runs against the device double (test_android_double.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from testbed.cli import app

SERIAL = os.environ.get("TESTBED_ANDROID_SERIAL")
BINARY = os.environ.get("TESTBED_BENCHMARK_MODEL")
pytestmark = [pytest.mark.android, pytest.mark.phone,
              pytest.mark.skipif(not (SERIAL and BINARY),
                                 reason="needs a real phone: set TESTBED_ANDROID_SERIAL and TESTBED_BENCHMARK_MODEL")]


def test_real_phone_check_and_profile(posenet_parts: Path) -> None:
    r = CliRunner().invoke(app, ["android", "check", "--serial", SERIAL, "--benchmark-model", BINARY])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["android", "profile", str(posenet_parts / "head_03.tflite"), "--serial", SERIAL,
                                 "--benchmark-model", BINARY, "--runs", "10", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["kpis"]["steady_mean_s"] > 0 and doc["phone"]["serial"] == SERIAL
