"""Link profiles: the schema of ``netem_profiles/*.yaml`` and how to find them.

Owns: the frozen, validated description of a link (per direction: rate, delay,
jitter, loss models, duplication, corruption, reordering, slotting, queue limit,
rate overhead) and of a time-varying link (``trace``: explicit steps or a
Mahimahi file converted to rate steps). Humans write units (``25mbit``,
``40ms``, ``0.5%``); the objects hold base units (``rate_bps``, ``delay_s``,
``*_pct``). Rules *between* fields ("loss correlation needs loss") live in
``testbed.link.params`` and are checked here at load time so the error names
the file and line.

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

from testbed.config import Frozen, Located, load_yaml, validate
from testbed.errors import ConfigError
from testbed.units import Bytes, Percent, RateBps, Seconds

PROFILE_DIR = Path(__file__).resolve().parents[2] / "netem_profiles"
DIRECTIONS = ("uplink", "downlink")


class _Schema(Frozen):
    # Code constructs objects with base-unit names (rate_bps=...), YAML uses
    # the short human key (rate: 25mbit) through the alias.
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


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
    gap: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return _scalar_as("percent")(value)


class Slot(_Schema):
    """Bursty MAC scheduling: packets leave in slots ``min_delay``..``max_delay``
    apart, at most ``packets`` / ``bytes`` per slot (0 = unlimited)."""

    min_delay_s: Seconds = Field(alias="min_delay")
    max_delay_s: Seconds | None = Field(None, alias="max_delay")
    packets: int = Field(0, ge=0)
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
    limit_packets: int | None = Field(None, alias="limit", gt=0)
    overhead_bytes: int = Field(0, alias="overhead", ge=-1024, le=1024)

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
        if self.window_s <= 0:
            raise ValueError("window must be positive")
        return self


class LinkProfile(_Schema):
    """A named link: uplink (local→remote) and downlink (remote→local)."""

    name: str
    description: str = ""
    source: str
    uplink: Direction | None = None
    downlink: Direction | None = None
    trace: Trace | None = None
    _path: Path | None = PrivateAttr(None)

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
        from testbed.link.params import needs_netem

        dirs = DIRECTIONS if which is None else (which,)
        for d in dirs:
            if any(needs_netem(x) for _, x in self.schedule(d)):
                return True
        return False

    def schedule(self, which: str) -> list[tuple[float, Direction]]:
        """The direction over time: ``[(at_s, Direction), ...]``; one entry at 0
        for a constant link, none when the direction is not shaped."""
        base = self.direction(which)
        if self.trace is None or self.trace.direction not in (which, "both"):
            return [] if base is None else [(0.0, base)]
        base = base or Direction()
        if self.trace.steps is not None:
            out = []
            for step in self.trace.steps:
                changes = {k: getattr(step, k) for k in step.model_fields_set if k != "at_s"}
                out.append((step.at_s, base.merged(changes)))
            return out
        from testbed.link.trace import mahimahi_steps

        steps = mahimahi_steps(self.mahimahi_path(), self.trace.window_s, self.trace.floor_bps)
        return [(at, base.merged({"rate_bps": rate})) for at, rate in steps]

    def period_s(self) -> float | None:
        """How often a looping trace repeats (None when it does not loop)."""
        if self.trace is None or not self.trace.loop:
            return None
        if self.trace.steps is not None:
            return self.trace.period_s
        from testbed.link.trace import mahimahi_period

        return self.trace.period_s or mahimahi_period(self.mahimahi_path(), self.trace.window_s)

    def mahimahi_path(self) -> Path:
        """The trace file, relative to the profile's folder."""
        assert self.trace is not None and self.trace.mahimahi is not None
        p = Path(self.trace.mahimahi)
        if not p.is_absolute():
            p = (self._path.parent if self._path else PROFILE_DIR) / p
        return p


def _check_rules(profile: LinkProfile, located: Located) -> None:
    """Cross-field rules from ``params`` reported at the offending line."""
    from testbed.link.params import check

    for which in DIRECTIONS:
        d = profile.direction(which)
        if d is not None:
            for loc, message in check(d):
                raise located.error(message, (which, *loc))
    if profile.trace is not None and profile.trace.steps is not None:
        for which in DIRECTIONS:
            for i, (_, d) in enumerate(profile.schedule(which)):
                for loc, message in check(d):
                    raise located.error(f"{message} (in {which} from this step on)", ("trace", "steps", i, *loc))


def resolve(name_or_path: str | Path) -> Path:
    """A bare name means ``netem_profiles/NAME.yaml``; anything else is a path."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or "/" in text:
        return Path(text)
    return PROFILE_DIR / f"{text}.yaml"


def load_profile(name_or_path: str | Path) -> LinkProfile:
    """Load and validate one profile by name (``netem_profiles/NAME.yaml``) or path.

    Raises:
        ConfigError: ``file:line: field: what`` (also for a name with no file).
    """
    path = resolve(name_or_path)
    if not path.exists():
        known = ", ".join(p.stem for p in sorted(PROFILE_DIR.glob("*.yaml")))
        raise ConfigError(f"no such link profile {str(name_or_path)!r} (known: {known})")
    located = load_yaml(path)
    if not isinstance(located.data, dict):
        raise located.error("expected a mapping with name, source, uplink, downlink")
    profile = validate(LinkProfile, located)
    profile._path = path.resolve()
    if profile.trace is not None and profile.trace.mahimahi is not None:
        if not profile.mahimahi_path().exists():
            raise located.error(f"trace file not found: {profile.mahimahi_path()}", ("trace", "mahimahi"))
        try:
            profile.schedule(profile.trace.direction if profile.trace.direction != "both" else "uplink")
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
