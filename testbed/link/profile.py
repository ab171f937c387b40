"""Link profiles: the schema of ``netem_profiles/*.yaml`` and how to find them.

Owns: the frozen, validated description of a link (per direction: rate, delay,
jitter, loss models, duplication, corruption, reordering, slotting, queue limit,
rate overhead) and of a time-varying link (``trace``: explicit steps or a
Mahimahi file converted to rate steps). Humans write units (``25mbit``,
``40ms``, ``0.5%``); the objects hold base units (``rate_bps``, ``delay_s``,
``*_pct``). Rules *between* fields ("loss correlation needs loss") live in
``testbed.link.params`` and are checked here at load time so the error names
the file and line.

Every value is checked at load time against what the kernel can take (the
ranges live in ``testbed.link.params``), so a profile ``netem validate``
accepts is one the shaper can install; a Mahimahi trace is read with the
bounds of ``testbed.link.trace`` and its steps are checked the same way.

Leaves to others: turning a direction into kernel parameters
(``testbed.link.params``) and touching the kernel (``testbed.link.shaper``).

Example::

    name: lte
    description: LTE, good coverage
    source: "3GPP TR 36.814 ...; Ookla 2023 medians"
    uplink:   {rate: 10mbit, delay: 25ms, jitter: 5ms, distribution: normal}
    downlink: {rate: 30mbit, delay: 25ms, jitter: 5ms, loss: 0.1%}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from testbed import resources
from testbed.config import Frozen, Int, Located, load_yaml, validate
from testbed.errors import ConfigError
from testbed.units import Bytes, Percent, RateBps, Seconds

# The shipped profiles: netem_profiles/ in a checkout, package data in an install.
PROFILE_DIR = resources.folder("netem_profiles")
DIRECTIONS = ("uplink", "downlink")
# Profile names key result rows and Prometheus labels and appear in one-line messages.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"
MAX_NAME = 64
MAX_TRACE_S = 7 * 24 * 3600.0   # step times and periods: a week is more than any sweep
MIN_WINDOW_S = 0.01             # the stepper's timing target is 10 ms: shorter windows cannot be followed


class _Schema(Frozen):
    # Code constructs objects with base-unit names (rate_bps=...), YAML uses
    # the short human key (rate: 25mbit) through the alias.
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, allow_inf_nan=False)


def _scalar_as(key: str):
    """Allow ``field: 1%`` as shorthand for ``field: {key: 1%}``."""
    def convert(value: Any) -> Any:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return {key: value}
        return value
    return convert


class Chance(_Schema):
    """A probability with optional correlation to the previous packet's draw."""

    percent_pct: Percent = Field(alias="percent")
    correlation_pct: Percent = Field(0.0, alias="correlation")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return _scalar_as("percent")(value)


class GEModel(_Schema):
    """Gilbert-Elliott loss (netem ``loss gemodel p r 1-h 1-k``).

    ``p``: good→bad transition probability; ``r``: bad→good; ``1-h``: loss
    probability in the bad state (default 100 %: the classic Gilbert model);
    ``1-k``: loss probability in the good state (default 0 %). Same meaning
    as tc's arguments; the kernel gets what tc sends (h = 100 % - ``1-h``,
    k1 = ``1-k``: see ``testbed.link.params``), checked byte for byte and on a
    netem kernel (tests/vm: 5 %/30 %/100 %/0 % loses ~14 %, bursts ~3).
    """

    p_pct: Percent = Field(alias="p")
    r_pct: Percent = Field(alias="r")
    one_minus_h_pct: Percent = Field(100.0, alias="1-h")
    one_minus_k_pct: Percent = Field(0.0, alias="1-k")


class FourState(_Schema):
    """The 4-state Markov loss model (netem ``loss state p13 p31 p32 p23 p14``).

    Defaults follow tc: p31 = 100 % - p13, p32 = 0, p23 = 100 %, p14 = 0.
    """

    p13_pct: Percent = Field(alias="p13")
    p31_pct: Percent | None = Field(None, alias="p31")
    p32_pct: Percent = Field(0.0, alias="p32")
    p23_pct: Percent = Field(100.0, alias="p23")
    p14_pct: Percent = Field(0.0, alias="p14")


class Loss(_Schema):
    """Exactly one of: ``random`` (+ ``correlation``), ``gemodel``, ``state``.

    ``loss: 1%`` is shorthand for ``loss: {random: 1%}``.
    """

    random_pct: Percent | None = Field(None, alias="random")
    correlation_pct: Percent = Field(0.0, alias="correlation")
    gemodel: GEModel | None = None
    state: FourState | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return _scalar_as("random")(value)

    @model_validator(mode="after")
    def _one_model(self) -> "Loss":
        given = [k for k in ("random_pct", "gemodel", "state") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one loss model: random (+ correlation), gemodel {p, r, 1-h, 1-k} "
                             "or state {p13, p31, p32, p23, p14}")
        return self


class Reorder(_Schema):
    """``percent`` of packets sent immediately (the rest delayed), with
    ``correlation``, optionally every ``gap``-th packet."""

    percent_pct: Percent = Field(alias="percent")
    correlation_pct: Percent = Field(0.0, alias="correlation")
    gap: Int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return _scalar_as("percent")(value)


class Slot(_Schema):
    """Bursty MAC scheduling: packets leave in slots ``min_delay``..``max_delay``
    apart, at most ``packets`` / ``bytes`` per slot (0 = unlimited)."""

    min_delay_s: Seconds = Field(alias="min_delay")
    max_delay_s: Seconds | None = Field(None, alias="max_delay")
    packets: Int = Field(0, ge=0)
    bytes_: Bytes = Field(0, alias="bytes")


class Direction(_Schema):
    """One direction of a link, in base units. Every field is optional; an
    empty direction means "leave this direction unshaped"."""

    rate_bps: RateBps | None = Field(None, alias="rate")
    delay_s: Seconds = Field(0.0, alias="delay")
    jitter_s: Seconds = Field(0.0, alias="jitter")
    distribution: Literal["uniform", "normal", "pareto", "paretonormal"] | None = None
    delay_correlation_pct: Percent = Field(0.0, alias="delay_correlation")
    loss: Loss | None = None
    duplicate: Chance | None = None
    corrupt: Chance | None = None
    reorder: Reorder | None = None
    slot: Slot | None = None
    limit_packets: Int | None = Field(None, alias="limit", gt=0)
    overhead_bytes: Int = Field(0, alias="overhead")   # range: testbed.link.params (0..1024)

    def is_empty(self) -> bool:
        return self == Direction()

    def merged(self, changes: dict[str, Any]) -> "Direction":
        """This direction with the (already validated) fields in ``changes``."""
        return self.model_copy(update=changes)


class Step(Direction):
    """A point of a time-varying trace: from ``at`` on, these fields apply."""

    at_s: Seconds = Field(alias="at")


class Trace(_Schema):
    """A time-varying link: explicit ``steps`` or a ``mahimahi`` file.

    ``steps``: each step overrides the listed fields of the profile's direction
    from ``at`` on. ``mahimahi``: a Mahimahi trace (one millisecond timestamp
    per line = one 1500-byte delivery opportunity), converted to rate steps of
    ``window`` each. ``loop`` repeats the trace every ``period`` (steps) or
    every trace length (Mahimahi). ``direction`` says which direction varies.
    """

    steps: list[Step] | None = None
    mahimahi: str | None = None
    window_s: Seconds = Field(0.5, alias="window")
    floor_bps: RateBps = Field(10_000, alias="floor")
    loop: bool = False
    period_s: Seconds | None = Field(None, alias="period")
    direction: Literal["uplink", "downlink", "both"] = "both"

    @model_validator(mode="after")
    def _one_kind(self) -> "Trace":
        if (self.steps is None) == (self.mahimahi is None):
            raise ValueError("give exactly one of steps: [...] or mahimahi: FILE")
        if self.steps is not None:
            if not self.steps:
                raise ValueError("steps must not be empty")
            ats = [s.at_s for s in self.steps]
            if ats != sorted(ats) or len(set(ats)) != len(ats):
                raise ValueError("step times (at) must be strictly increasing")
            if self.loop and (self.period_s is None or self.period_s <= ats[-1]):
                raise ValueError("a looping trace needs period: longer than the last step's at")
        if not MIN_WINDOW_S <= self.window_s <= MAX_TRACE_S:
            raise ValueError(f"window must be within {MIN_WINDOW_S:g}s and {MAX_TRACE_S:g}s "
                             f"(the stepper follows steps to ~10 ms), got {self.window_s:g}s")
        late = [s.at_s for s in self.steps or []] + [self.period_s or 0.0]
        if max(late) > MAX_TRACE_S:
            raise ValueError(f"step times and period must be within 0s and {MAX_TRACE_S:g}s (a week), "
                             f"got {max(late):g}s")
        return self


class LinkProfile(_Schema):
    """A named link: uplink (local→remote) and downlink (remote→local)."""

    name: str = Field(min_length=1, max_length=MAX_NAME, pattern=NAME_PATTERN)
    description: str = ""
    source: str
    uplink: Direction | None = None
    downlink: Direction | None = None
    trace: Trace | None = None
    _path: Path | None = PrivateAttr(None)
    # (steps, period) of a Mahimahi trace: read once per profile, not per schedule() call
    _mahimahi: tuple[list[tuple[float, int]], float] | None = PrivateAttr(None)

    @field_validator("source")
    @classmethod
    def _source_given(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("say where the numbers come from (a standard, a measurement, a paper)")
        return v

    @property
    def path(self) -> Path | None:
        """The file the profile was loaded from (None when built in code)."""
        return self._path

    def direction(self, which: str) -> Direction | None:
        """``uplink`` or ``downlink``."""
        if which not in DIRECTIONS:
            raise ValueError(f"direction must be uplink or downlink, not {which!r}")
        return getattr(self, which)

    def needs_netem(self, which: str | None = None) -> bool:
        """True when the direction (or any, when None) needs sch_netem, i.e.
        asks for more than a rate. Trace steps count too."""
        dirs = DIRECTIONS if which is None else (which,)
        for d in dirs:
            if any(needs_netem(x) for _, x in self.schedule(d)):
                return True
        return False

    def schedule(self, which: str) -> list[tuple[float, Direction]]:
        """The direction over time: ``[(at_s, Direction), ...]``; one entry at 0
        for a constant link, none when the direction is not shaped (absent or
        empty: ``uplink: {}`` leaves the uplink alone, as documented on Direction)."""
        base = self.direction(which)
        if self.trace is None or self.trace.direction not in (which, "both"):
            return [] if base is None or base.is_empty() else [(0.0, base)]
        base = base or Direction()
        if self.trace.steps is not None:
            out = []
            for step in self.trace.steps:
                changes = {k: getattr(step, k) for k in step.model_fields_set if k != "at_s"}
                out.append((step.at_s, base.merged(changes)))
            return out
        steps, _ = self._mahimahi_trace()
        return [(at, base.merged({"rate_bps": rate})) for at, rate in steps]

    def _mahimahi_trace(self) -> tuple[list[tuple[float, int]], float]:
        """(rate steps, period) of the Mahimahi file, read once. Raises ValueError."""
        if self._mahimahi is None:
            from testbed.link.trace import mahimahi_period, mahimahi_steps

            assert self.trace is not None
            path = self.mahimahi_path()
            steps = mahimahi_steps(path, self.trace.window_s, self.trace.floor_bps)
            self._mahimahi = (steps, mahimahi_period(path, self.trace.window_s))
        return self._mahimahi

    def period_s(self) -> float | None:
        """How often a looping trace repeats (None when it does not loop)."""
        if self.trace is None or not self.trace.loop:
            return None
        if self.trace.steps is not None:
            return self.trace.period_s
        return self.trace.period_s or self._mahimahi_trace()[1]

    def mahimahi_path(self) -> Path:
        """The trace file, relative to the profile's folder."""
        assert self.trace is not None and self.trace.mahimahi is not None
        p = Path(self.trace.mahimahi)
        if not p.is_absolute():
            p = (self._path.parent if self._path else PROFILE_DIR) / p
        return p


# --------------------------------------------------------------------------- rules of the schema
# The kernel's ranges and the rules between a direction's fields. They are the
# schema's rules (checked at load, reported at the offending line);
# ``testbed.link.params`` turns a valid direction into kernel parameters.

MTU_BYTES = 1500
U32_MAX = 2**32 - 1
S32_MAX = 2**31 - 1

# --- what the kernel (and the netlink messages we send) can carry -----------------
# Checked by ``check`` at load time, so a profile that ``netem validate`` accepts
# can be installed: before these, a 1e30tbit rate or a 2^40 limit failed while
# pyroute2 packed the message, after the nodes were deployed.
#
# rate: tbf's ``tc_ratespec.rate`` is u32 bytes/s and pyroute2 0.9 sends no
#   TCA_TBF_RATE64 (htb and netem have 64-bit attributes, tbf is the default).
#   Floor: the kernel refuses a zero rate (qdisc_get_rtab) and the rate table
#   pyroute2 computes holds u32 psched ticks (64 ns) per cell up to 2048 bytes:
#   2048 B at 8 B/s is 4.0e9 ticks, at 7 B/s it overflows.
MIN_RATE_BPS = 64
MAX_RATE_BPS = U32_MAX * 8                 # 34.36 Gbit/s
# delay: netem takes s64 ns (TCA_NETEM_LATENCY64) and adds it to the current
#   time in ns, which overflows long before 2^63 ns; an hour is far beyond any
#   network and keeps every sum (delay + jitter + slot) well inside.
MAX_DELAY_S = 3600.0
# jitter: netem_change caps it at INT_MAX ns ("capping jitter to the range
#   acceptable by tabledist()"): more would be silently shortened.
MAX_JITTER_S = S32_MAX / 1e9               # 2.147483647 s
# limit: tbf's queue limit is u32 *bytes* (packets x 1500); pfifo and netem take u32 packets.
MAX_LIMIT_PACKETS = U32_MAX // MTU_BYTES   # 2,863,311
MAX_SLOT_COUNT = S32_MAX                   # tc_netem_slot.max_packets / max_bytes are s32
MAX_GAP = U32_MAX                          # tc_netem_qopt.gap is u32
MAX_OVERHEAD_BYTES = 1024                  # htb's tc_ratespec.overhead is u16: unsigned


def _ranges(d: Direction) -> list[tuple[tuple[str, ...], str]]:
    """Values outside what the kernel can take, with the accepted range."""
    out: list[tuple[tuple[str, ...], str]] = []

    def within(loc: tuple[str, ...], value: float | None, lo: float, hi: float, show, why: str) -> None:
        if value is not None and not lo <= value <= hi:
            out.append((loc, f"must be within {show(lo)} and {show(hi)} ({why}), got {show(value)}"))

    within(("rate",), d.rate_bps, MIN_RATE_BPS, MAX_RATE_BPS, _rate,
           "tbf takes a non-zero 32-bit bytes/s rate")
    within(("delay",), d.delay_s, 0.0, MAX_DELAY_S, _seconds, "the testbed's bound on netem's delay")
    within(("jitter",), d.jitter_s, 0.0, MAX_JITTER_S, _seconds, "netem caps jitter at 2^31-1 ns")
    within(("limit",), d.limit_packets, 1, MAX_LIMIT_PACKETS, _count,
           "tbf's queue limit is 32-bit bytes of 1500-byte packets")
    within(("overhead",), d.overhead_bytes, 0, MAX_OVERHEAD_BYTES, _count,
           "htb, which carries it, counts it unsigned")
    if d.reorder is not None:
        within(("reorder", "gap"), d.reorder.gap, 0, MAX_GAP, _count, "netem's gap is 32-bit")
    if d.slot is not None:
        within(("slot", "min_delay"), d.slot.min_delay_s, 0.0, MAX_DELAY_S, _seconds, "as delay")
        within(("slot", "max_delay"), d.slot.max_delay_s, 0.0, MAX_DELAY_S, _seconds, "as delay")
        within(("slot", "packets"), d.slot.packets, 0, MAX_SLOT_COUNT, _count, "netem's slot fields are signed 32-bit")
        within(("slot", "bytes"), d.slot.bytes_, 0, MAX_SLOT_COUNT, _count, "netem's slot fields are signed 32-bit")
    return out


def _rate(bps: float) -> str:
    return f"{bps:g}bit" if bps < 1000 else f"{bps / 1e3:g}kbit" if bps < 1e6 else f"{bps / 1e9:.10g}gbit"


def _seconds(s: float) -> str:
    return f"{s:.10g}s"


def _count(n: float) -> str:
    return f"{n:g}" if isinstance(n, float) else str(n)


def needs_netem(d: Direction) -> bool:
    """True when ``d`` asks for more than a rate (and its overhead / queue)."""
    return bool(d.delay_s or d.jitter_s or d.loss or d.duplicate or d.corrupt or d.reorder or d.slot
                or d.distribution not in (None, "uniform") or d.delay_correlation_pct)


def check(d: Direction) -> list[tuple[tuple[str, ...], str]]:
    """Kernel ranges, then rules between fields. Returns ``[(field path (YAML
    keys), message), ...]``; empty when fine."""
    out = _ranges(d)
    if d.jitter_s and not d.delay_s:
        out.append((("jitter",), "jitter needs delay (netem draws each packet's delay as delay ± jitter)"))
    if d.distribution is not None and not d.jitter_s:
        out.append((("distribution",), "a delay distribution needs jitter (it shapes how delay varies)"))
    if d.delay_correlation_pct and not d.jitter_s:
        out.append((("delay_correlation",), "delay correlation needs jitter (and delay)"))
    if d.loss is not None and d.loss.random_pct is not None:
        if d.loss.correlation_pct and not d.loss.random_pct:
            out.append((("loss", "correlation"), "loss correlation needs a non-zero random loss"))
    elif d.loss is not None and d.loss.correlation_pct:
        out.append((("loss", "correlation"), "correlation goes with random loss only; "
                                             "gemodel and state models have their own transition probabilities"))
    for name in ("duplicate", "corrupt"):
        chance = getattr(d, name)
        if chance is not None and chance.correlation_pct and not chance.percent_pct:
            out.append(((name, "correlation"), f"{name} correlation needs a non-zero {name} percent"))
    if d.reorder is not None:
        if not d.delay_s:
            out.append((("reorder",), "reordering needs delay (reordered packets are those sent without it)"))
        elif (d.reorder.correlation_pct or d.reorder.gap) and not d.reorder.percent_pct:
            out.append((("reorder", "percent"), "reorder correlation/gap need a non-zero reorder percent"))
    if d.slot is not None and d.slot.max_delay_s is not None and d.slot.max_delay_s < d.slot.min_delay_s:
        out.append((("slot", "max_delay"), "max_delay must not be below min_delay"))
    if d.overhead_bytes and d.rate_bps is None:
        out.append((("overhead",), "overhead adjusts a rate; give rate too"))
    if d.limit_packets is not None and d.rate_bps is None and not needs_netem(d):
        out.append((("limit",), "limit sizes the queue of a rate or a netem; give rate (or delay, loss, ...) too"))
    return out




def _check_rules(profile: LinkProfile, located: Located) -> None:
    """Kernel ranges and cross-field rules (``check``), reported at the
    offending line: the base direction when it is installed as written, every
    step of the schedule when a trace drives the direction."""
    trace = profile.trace
    for which in DIRECTIONS:
        traced = trace is not None and trace.direction in (which, "both")
        d = profile.direction(which)
        if not traced:
            for loc, message in check(d) if d is not None else []:
                raise located.error(message, (which, *loc))
            continue
        for i, (at, step) in enumerate(profile.schedule(which)):
            problems = check(step) or ([((), "this step leaves nothing to shape (no rate, delay, loss, ...)")]
                                       if step.is_empty() else [])
            for loc, message in problems:
                if trace.steps is not None:
                    raise located.error(f"{message} (in {which} from this step on)",
                                        ("trace", "steps", i, *loc))
                raise located.error(f"the window at {at:g}s gives {'.'.join(loc)} {message}", ("trace", "mahimahi"))


def resolve(name_or_path: str | Path) -> Path:
    """A bare name means ``netem_profiles/NAME.yaml``; anything else is a path."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or "/" in text:
        return Path(text)
    return PROFILE_DIR / f"{text}.yaml"


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:   # e.g. a name longer than the file system allows
        return False


def load_profile(name_or_path: str | Path) -> LinkProfile:
    """Load and validate one profile by name (``netem_profiles/NAME.yaml``) or path.

    Raises:
        ConfigError: ``file:line: field: what`` (also for a name with no file).
    """
    path = resolve(name_or_path)
    if not _exists(path):
        known = ", ".join(p.stem for p in sorted(PROFILE_DIR.glob("*.yaml")))
        shown = str(name_or_path) if len(str(name_or_path)) <= 80 else str(name_or_path)[:80] + "…"
        raise ConfigError(f"no such link profile {shown!r} (known: {known})")
    located = load_yaml(path)
    if not isinstance(located.data, dict):
        raise located.error("expected a mapping with name, source, uplink, downlink")
    profile = validate(LinkProfile, located)
    profile._path = path.resolve()
    if profile.trace is not None and profile.trace.mahimahi is not None:
        if not _exists(profile.mahimahi_path()):
            raise located.error(f"trace file not found: {profile.mahimahi_path()}", ("trace", "mahimahi"))
        try:
            profile._mahimahi_trace()
        except ValueError as e:
            raise located.error(str(e), ("trace", "mahimahi")) from None
    _check_rules(profile, located)
    return profile


def list_profiles(folder: str | Path | None = None) -> list[LinkProfile]:
    """Every profile in ``folder`` (default: the shipped ``netem_profiles/``), by name."""
    folder = Path(folder) if folder else PROFILE_DIR
    return sorted((load_profile(p) for p in folder.glob("*.yaml")), key=lambda p: p.name)


__all__ = ["Direction", "LinkProfile", "Trace", "Step", "Loss", "GEModel", "FourState", "Chance",
           "Reorder", "Slot", "load_profile", "list_profiles", "resolve", "PROFILE_DIR"]
