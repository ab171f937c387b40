"""One phone as the testbed uses it: which phone, what it is, its state, and benchmark_model on it.

Owns choosing the phone (``serial: auto`` or a serial; every wrong state said plainly),
what it is (getprop: model, SoC, ABI, Android version), its state (CPU frequencies from
``/sys``, thermal zones and ``dumpsys thermalservice``, ``dumpsys battery``), the big-core
mask derived from ``cpuinfo_max_freq``, the run's folder ``/data/local/tmp/testbed-<run
id>/`` (created with an owner record, removed at the end, on Ctrl-C and by ``testbed
cleanup``), installing the user's ``benchmark_model`` (ELF checked against the phone's ABI,
``--help`` read to learn which flags this version has) and running it. Talking to adb is
``testbed.android.adb``'s; reading the tool's output ``testbed.android.output``'s.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from testbed.android.adb import Adb, AndroidError
from testbed.android.output import BenchmarkOutput, OutputError, help_flags, parse_benchmark_output, parse_op_csv

REMOTE_BASE = "/data/local/tmp"
PREFIX = "testbed-"
OWNER_FILE = ".testbed-owner.json"
DELEGATES = ("cpu", "xnnpack", "gpu", "nnapi")
# ELF e_machine → the Android ABI that runs it
_ELF_ABI = {0xB7: "arm64-v8a", 0x28: "armeabi-v7a", 0x3E: "x86_64", 0x03: "x86"}


def workdir(run_id: str) -> str:
    return f"{REMOTE_BASE}/{PREFIX}{run_id}"


@dataclass
class DeviceInfo:
    serial: str
    state: str
    model: str | None = None
    manufacturer: str | None = None
    soc: str | None = None
    abi: str | None = None
    abilist: list[str] = field(default_factory=list)
    android: str | None = None
    sdk: str | None = None


@dataclass
class DeviceState:
    """What the phone reported at one moment (None: not readable on this phone)."""

    cpu_cur_khz: dict[int, int] = field(default_factory=dict)
    cpu_max_khz: dict[int, int] = field(default_factory=dict)
    thermal_zones_c: dict[str, float] = field(default_factory=dict)
    thermal_status: int | None = None
    battery_level: int | None = None
    battery_temp_c: float | None = None
    charging: bool | None = None

    @property
    def max_temp_c(self) -> float | None:
        temps = list(self.thermal_zones_c.values())
        if self.battery_temp_c is not None:
            temps.append(self.battery_temp_c)
        return max(temps) if temps else None

    def freq_ratio(self) -> float | None:
        """Σ current ÷ Σ maximum frequency over the cores that report both (1.0: nothing held back)."""
        cores = [c for c in self.cpu_cur_khz if c in self.cpu_max_khz and self.cpu_max_khz[c]]
        if not cores:
            return None
        return sum(self.cpu_cur_khz[c] for c in cores) / sum(self.cpu_max_khz[c] for c in cores)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def elf_abi(path: Path) -> str | None:
    """The Android ABI an ELF file is built for (None: not an ELF file)."""
    with path.open("rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return _ELF_ABI.get(struct.unpack_from("<H", head, 18)[0], f"machine {struct.unpack_from('<H', head, 18)[0]}")


def core_mask(spec: str, max_khz: dict[int, int]) -> str | None:
    """``big`` → the cores with the highest ``cpuinfo_max_freq``; ``all`` → None (no pinning);
    a hex mask → itself, checked against the phone's cores. Returned as hex without 0x."""
    if spec == "all":
        return None
    if spec == "big":
        if not max_khz:
            raise AndroidError("cannot derive the big cores: cpuinfo_max_freq is not readable; "
                               "give cores: MASK (hex) or cores: all")
        top = max(max_khz.values())
        return format(sum(1 << c for c, f in max_khz.items() if f == top), "x")
    text = spec.lower().removeprefix("0x")
    if not re.fullmatch(r"[0-9a-f]{1,16}", text) or int(text, 16) == 0:
        raise AndroidError(f"cores: {spec!r} is not big, all or a hexadecimal CPU mask such as f0")
    if max_khz and int(text, 16) >> (max(max_khz) + 1):
        raise AndroidError(f"cores: mask {spec} names CPUs the phone does not have (it has {len(max_khz)})")
    return text


class Phone:
    """A phone in the ``device`` state, reached through ``adb``."""

    def __init__(self, adb: Adb, serial: str) -> None:
        self.adb = adb
        self.serial = serial
        self.flags: dict[str, str] = {}
        self.tool: str | None = None
        self.benchmark_path: str | None = None
        self.run_dir: str | None = None

    # ---- choosing -------------------------------------------------------------
    @classmethod
    def select(cls, adb: Adb, serial: str | None = "auto") -> "Phone":
        """The phone to use. Raises AndroidError (one line, what to do) for none, several
        without a serial, a serial not attached, unauthorized, offline."""
        devices = adb.devices()
        if serial in (None, "", "auto"):
            usable = [d for d in devices if d[1] == "device"]
            if not devices:
                raise AndroidError(f"no phone on adb (server on port {adb.port}): plug one in with USB debugging "
                                   f"on{_user_server_hint(adb.port)}")
            if len(devices) > 1 and len(usable) != 1:
                names = ", ".join(f"{s} ({st})" for s, st, _ in devices)
                raise AndroidError(f"several phones attached ({names}): name one with --serial or serial: SERIAL")
            serial = (usable or devices)[0][0]
        states = {s: st for s, st, _ in devices}
        if serial not in states:
            attached = ", ".join(states) or "none"
            raise AndroidError(f"not attached to adb on port {adb.port} (attached: {attached}); plug it in "
                               "or fix the serial", serial=serial)
        state = states[serial]
        if state == "unauthorized":
            raise AndroidError("is unauthorized: unlock it, accept the 'Allow USB debugging' prompt, then retry",
                               serial=serial)
        if state == "offline":
            raise AndroidError("is offline: reconnect the cable (or `adb reconnect`), then retry", serial=serial)
        if state != "device":
            raise AndroidError(f"is in state {state!r}, not 'device': boot it normally, then retry", serial=serial)
        return cls(adb, serial)

    # ---- what it is, how it is ------------------------------------------------
    def sh(self, command: str, timeout_s: float | None = 120.0) -> Any:
        return self.adb.shell(self.serial, command, timeout_s)

    def info(self) -> DeviceInfo:
        props = parse_getprop(self.sh("getprop").stdout)
        soc = " ".join(x for x in (props.get("ro.soc.manufacturer"), props.get("ro.soc.model")) if x) or \
            props.get("ro.board.platform") or props.get("ro.hardware")
        abilist = [a for a in props.get("ro.product.cpu.abilist", "").split(",") if a]
        abi = props.get("ro.product.cpu.abi") or (abilist[0] if abilist else None)
        return DeviceInfo(serial=self.serial, state="device", model=props.get("ro.product.model"),
                          manufacturer=props.get("ro.product.manufacturer"), soc=soc, abi=abi,
                          abilist=abilist or ([abi] if abi else []), android=props.get("ro.build.version.release"),
                          sdk=props.get("ro.build.version.sdk"))

    def state(self) -> DeviceState:
        """CPU frequencies, thermal zones and status, battery: one shell round trip."""
        cmd = ("grep -sH '' /sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq "
               "/sys/devices/system/cpu/cpu[0-9]*/cpufreq/cpuinfo_max_freq "
               "/sys/class/thermal/thermal_zone*/type /sys/class/thermal/thermal_zone*/temp; "
               "echo ==battery==; dumpsys battery; echo ==thermal==; dumpsys thermalservice")
        return parse_state(self.sh(cmd, timeout_s=60).stdout)

    def free_kb(self, path: str = REMOTE_BASE) -> int | None:
        out = self.sh(f"df -k {shlex.quote(path)}").stdout.strip().splitlines()
        if len(out) < 2:
            return None
        fields = out[-1].split()
        try:
            return int(fields[3])
        except (IndexError, ValueError):
            return None

    # ---- the run's folder -----------------------------------------------------
    def open_run(self, run_id: str, need_bytes: int = 0) -> str:
        """Create ``/data/local/tmp/testbed-<run id>`` with an owner record; refuse when the
        phone lacks the room for ``need_bytes``."""
        free = self.free_kb()
        if free is not None and need_bytes and free * 1024 < need_bytes * 1.1:
            raise AndroidError(f"{REMOTE_BASE} is full ({free // 1024} MiB free, {need_bytes // 2**20 + 1} MiB "
                               f"needed): delete files there (adb -s {self.serial} shell ls {REMOTE_BASE}), "
                               "then retry", serial=self.serial)
        d = workdir(run_id)
        r = self.sh(f"mkdir -p {shlex.quote(d)}")
        if r.exit_code != 0:
            raise AndroidError(f"cannot create {d}: {r.output.strip()}", serial=self.serial)
        from testbed.deploy.owner import tag

        owner = json.dumps({"run_id": run_id, "host": socket.gethostname(), "owner": tag()}).encode()
        self.adb.push(self.serial, owner, f"{d}/{OWNER_FILE}")
        self.run_dir = d
        return d

    def close_run(self) -> None:
        """Remove the run's folder (what was pushed goes with it)."""
        if self.run_dir:
            self.sh(f"rm -rf {shlex.quote(self.run_dir)}", timeout_s=60)
            self.run_dir = None

    def push(self, source: Path | bytes, name: str, mode: int = 0o644) -> str:
        assert self.run_dir, "open_run first"
        dest = f"{self.run_dir}/{name}"
        self.adb.push(self.serial, source, dest, mode)
        return dest

    # ---- benchmark_model ------------------------------------------------------
    def install_benchmark(self, binary: Path, abilist: Iterable[str]) -> dict[str, str]:
        """Push the user's benchmark_model, check its ABI, learn its flags from ``--help``."""
        if not binary.is_file():
            raise AndroidError(f"benchmark_model {binary} is not a file: download TFLite's Android benchmark "
                               "binary (android_aarch64_benchmark_model) and name it in benchmark_model:")
        abi = elf_abi(binary)
        abis = list(abilist)
        if abi is None:
            raise AndroidError(f"benchmark_model {binary} is not an Android executable (no ELF header): download "
                               f"the build for {abis[0] if abis else 'the phone'}", serial=self.serial)
        if abis and abi not in abis:
            raise AndroidError(f"benchmark_model {binary} is built for {abi}, the phone runs {', '.join(abis)}: "
                               f"download the {abis[0]} build", serial=self.serial)
        self.benchmark_path = self.push(binary, "benchmark_model", 0o755)
        r = self.sh(f"{shlex.quote(self.benchmark_path)} --help", timeout_s=60)
        self.flags = help_flags(r.output)
        if not self.flags:
            first = (r.output.strip().splitlines() or [f"exit {r.exit_code}, no output"])[-1]
            raise AndroidError(f"benchmark_model does not run ({first}): check it is executable and built for "
                               f"{abis[0] if abis else 'this phone'}", serial=self.serial)
        self.tool = "litert" if "use_npu" in self.flags and "enable_op_profiling" not in self.flags else "tflite"
        return self.flags

    @property
    def op_profiling(self) -> str | None:
        """How this version reports op profiling: ``csv-file``, ``legacy-csv-file``, ``stdout`` or None."""
        if "enable_op_profiling" not in self.flags:
            return None
        if "op_profiling_output_file" in self.flags:
            return "csv-file"
        if "profiling_output_csv_file" in self.flags:
            return "legacy-csv-file"
        return "stdout"

    def benchmark_args(self, graph: str, *, threads: int | None, delegate: str, runs: int, warmup: int,
                       op_profiling: bool, csv_path: str | None) -> list[str]:
        args = [f"--graph={graph}", f"--num_runs={runs}", f"--warmup_runs={max(1, warmup)}"]
        if threads:
            args.append(f"--num_threads={threads}")
        if delegate == "cpu":
            if "use_xnnpack" in self.flags:
                args.append("--use_xnnpack=false")
            elif "use_cpu" in self.flags:
                args.append("--use_cpu=true")
        else:
            flag = {"xnnpack": "use_xnnpack", "gpu": "use_gpu", "nnapi": "use_nnapi"}[delegate]
            if flag not in self.flags:
                raise AndroidError(f"this benchmark_model has no --{flag} (its --help lists none): use another "
                                   "delegate or a build that has it", serial=self.serial)
            args.append(f"--{flag}=true")
        if "report_peak_memory_footprint" in self.flags:
            args.append("--report_peak_memory_footprint=true")
        if op_profiling and self.op_profiling:
            args.append("--enable_op_profiling=true")
            if csv_path and self.op_profiling == "csv-file":
                args += ["--op_profiling_output_mode=csv", f"--op_profiling_output_file={csv_path}"]
            elif csv_path and self.op_profiling == "legacy-csv-file":
                args.append(f"--profiling_output_csv_file={csv_path}")
        return args

    def benchmark(self, graph: str, *, threads: int | None = None, mask: str | None = None, delegate: str = "cpu",
                  runs: int = 50, warmup: int = 1, op_profiling: bool = False,
                  timeout_s: float = 900.0) -> tuple[BenchmarkOutput, str]:
        """Run benchmark_model on ``graph`` (a path on the phone); returns the parsed output and
        the raw text. Raises AndroidError when the tool fails (the phone refused the model)."""
        assert self.benchmark_path, "install_benchmark first"
        name = os.path.basename(graph).rsplit(".", 1)[0]
        csv_path = f"{self.run_dir}/ops_{name}.csv" if op_profiling and self.op_profiling in (
            "csv-file", "legacy-csv-file") else None
        argv = [self.benchmark_path, *self.benchmark_args(graph, threads=threads, delegate=delegate, runs=runs,
                                                          warmup=warmup, op_profiling=op_profiling,
                                                          csv_path=csv_path)]
        if mask:
            argv = ["taskset", mask, *argv]
        r = self.sh(" ".join(shlex.quote(a) for a in argv), timeout_s=timeout_s)
        text = r.stdout + r.stderr
        try:
            out = parse_benchmark_output(text)
        except OutputError:
            out = None
        if r.exit_code != 0 or out is None or not out.complete:
            errors = (out.errors if out else []) or [ln for ln in text.strip().splitlines()[-3:] if ln.strip()]
            reason = "; ".join(e for e in errors if e and "Benchmarking failed" not in e) or f"exit {r.exit_code}"
            raise AndroidError(f"benchmark_model refused {os.path.basename(graph)}: {reason}: check that this "
                               "TFLite runtime supports the model's operators (or try another delegate)",
                               serial=self.serial)
        if csv_path:
            try:
                ops = parse_op_csv(self.adb.pull(self.serial, csv_path).decode(errors="replace"))
                out.ops, out.init_ops, out.op_layout = ops.ops, ops.init_ops, ops.op_layout
                out.op_run_total = ops.op_run_total
            except (OutputError, AndroidError):
                pass                      # no CSV: the tables (if any) stay those of stdout
        return out, text


def parse_getprop(text: str) -> dict[str, str]:
    return dict(re.findall(r"^\[([^\]]+)\]: \[(.*)\]\s*$", text, flags=re.M))


def parse_state(text: str) -> DeviceState:
    st = DeviceState()
    sysfs, _, rest = text.partition("==battery==")
    battery, _, thermal = rest.partition("==thermal==")
    zone_type: dict[str, str] = {}
    zone_temp: dict[str, float] = {}
    for line in sysfs.splitlines():
        path, _, value = line.partition(":")
        value = value.strip()
        m = re.search(r"/cpu(\d+)/cpufreq/(scaling_cur_freq|cpuinfo_max_freq)$", path)
        if m and value.isdigit():
            (st.cpu_cur_khz if m.group(2) == "scaling_cur_freq" else st.cpu_max_khz)[int(m.group(1))] = int(value)
            continue
        m = re.search(r"/(thermal_zone\d+)/(type|temp)$", path)
        if m:
            if m.group(2) == "type":
                zone_type[m.group(1)] = value
            elif re.fullmatch(r"-?\d+", value):
                zone_temp[m.group(1)] = int(value) / 1000.0
    for zone, temp in zone_temp.items():
        if -40.0 < temp < 150.0:         # zones without a sensor report nonsense
            st.thermal_zones_c[zone_type.get(zone, zone)] = temp
    b = dict(re.findall(r"^\s*([A-Za-z ]+): (.+?)\s*$", battery, flags=re.M))
    if b.get("level", "").isdigit():
        st.battery_level = int(b["level"])
    if re.fullmatch(r"-?\d+", b.get("temperature", "")):
        st.battery_temp_c = int(b["temperature"]) / 10.0
    powered = [b.get(k) for k in ("AC powered", "USB powered", "Wireless powered") if k in b]
    if powered:
        st.charging = any(p == "true" for p in powered)
    m = re.search(r"^Thermal Status: (\d+)", thermal, flags=re.M)
    if m:
        st.thermal_status = int(m.group(1))
    return st


def _user_server_hint(port: int) -> str:
    from testbed.android.adb import USER_PORT, _answers

    if port != USER_PORT and _answers(USER_PORT):
        return (f"; an adb server on port {USER_PORT} is running and may hold the phone: stop it "
                f"(`adb kill-server`) or use it with TESTBED_ADB_PORT={USER_PORT}")
    return "; or `adb connect HOST:PORT` for a phone on Wi-Fi"


def cleanup_phones(adb: Adb, run_id: str | None = None, serials: Iterable[str] | None = None) -> list[str]:
    """Remove ``/data/local/tmp/testbed-*`` folders from every attached phone (or those in
    ``serials``): the named run's, or (None) those whose owner process on this host is gone."""
    from testbed.deploy.owner import alive

    removed: list[str] = []
    try:
        devices = adb.devices()
    except AndroidError:
        return removed
    wanted = set(serials) if serials is not None else None
    for serial, state, _ in devices:
        if state != "device" or (wanted is not None and serial not in wanted):
            continue
        phone = Phone(adb, serial)
        try:
            names = phone.sh(f"ls {REMOTE_BASE}", timeout_s=30).stdout.split()
        except AndroidError:
            continue
        for name in names:
            if not name.startswith(PREFIX):
                continue
            folder = f"{REMOTE_BASE}/{name}"
            if run_id is not None:
                if name != PREFIX + run_id:
                    continue
            else:
                try:
                    owner = json.loads(adb.pull(serial, f"{folder}/{OWNER_FILE}"))
                except (AndroidError, ValueError):
                    owner = {}
                host = owner.get("host")
                if host not in (None, socket.gethostname()) or (host and alive(owner.get("owner"))):
                    continue          # another machine's run (cannot tell), or a live run here
            phone.sh(f"rm -rf {shlex.quote(folder)}", timeout_s=60)
            removed.append(f"phone {serial}: {folder}")
    return removed
