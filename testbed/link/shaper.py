"""The shaper: apply, change in place, clear and read back one direction of a link.

Owns: the order of qdisc operations on one interface's egress, refusing what
the kernel cannot do *before* touching anything, the rule that the root qdisc
stays between configurations (``change`` edits the root's rate limiter — the
tbf, or the htb class — and the netem leaf in place, so traffic is never blackholed), the state record (``testbed.link.state``)
that lets ``clear`` and crashed-run cleanup remove exactly what we added, and
``capabilities()``.

Leaves to others: what to install (``testbed.link.params``, pure), the netlink
calls themselves (``testbed.link.netlink``), time-varying traces
(``testbed.link.stepper``).

An ingress target (``Target(..., ingress=True)``: what an interface receives) is
shaped with the same qdiscs at the egress of the IFB device the interface's
ingress is redirected to (``netlink.ifb_attach``, done before the first qdisc);
``clear`` removes the qdiscs, the redirect and the IFB device.

``match_sport`` shapes one flow on an interface others use too (the downlink on an
ssh remote's own interface, where the SSH connection also leaves): an htb root only
to classify — a u32 filter sends packets with that TCP/UDP source port to class
7462:1, everything else to the default class 7462:2; both pass at line rate — and
the profile shaped by the tbf arrangement under 7462:1 (a tbf splits GSO
super-packets; an htb class would let a whole one through, ``testbed.link.params``).

Layout on the interface (handles are fixed so our qdiscs are recognisable)::

    arrangement tbf (default):  7462: tbf root ── (7462:1) ── 7463: pfifo (rate only)
                                                          └── 7464: netem (delay, loss, ...)
    arrangement htb:            7462: htb root ── 7462:1 class (rate = ceil) ── 7463: pfifo | 7464: netem
    arrangement netem:          7462: netem root (netem's own rate)
    match_sport (one flow):     7462: htb root ┬ 7462:1 (u32 sport) ── 7465: tbf ── (7465:1) ── 7463: | 7464:
                                               └ 7462:2 default (everything else, unshaped)

Example::

    with Shaper(Target("veth0", netns="tbA")) as s:
        s.apply(load_profile("ladder-10mbit").uplink)     # -> "tbf"
        s.change(load_profile("lte").uplink)             # in place -> "tbf+netem" (netem kernel)
        s.clear()
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.errors import ShapingError
from testbed.link import netlink, state
from testbed.link.netlink import TC_H_ROOT, handle, handle_str
from testbed.link.params import MAX_TIMER_SLACK_S, TIMER_SLACK_S, KernelParams, kernel_params
from testbed.link.profile import Direction
from testbed.link.target import Target

TAG = 0x7462                       # "tb": major of every qdisc the shaper adds
ROOT = handle(TAG)                 # 7462:
CLASS = handle(TAG, 1)             # 7462:1 (htb class / tbf's inner class)
PFIFO_LEAF = handle(TAG + 1)       # 7463:
NETEM_LEAF = handle(TAG + 2)       # 7464:
FLOW_TBF = handle(TAG + 3)         # 7465: the flow's tbf (match_sport)
FLOW_CLASS = handle(TAG + 3, 1)    # 7465:1 its inner class, where the leaf goes
OTHERS = handle(TAG, 2)            # 7462:2 the default class: everything but the flow
MTU_BYTES = 1500


@dataclass(frozen=True)
class Capabilities:
    """Which qdiscs this kernel has (after trying ``modprobe sch_netem``)."""

    netem: bool
    htb: bool
    tbf: bool
    kernel: str = ""
    timer_slack_s: float = TIMER_SLACK_S   # sizes rate-limiter buckets (params.burst_bytes)

    def missing(self, params: KernelParams) -> list[str]:
        need = [params.root] if params.root != "netem" else []
        if params.netem is not None or params.root == "netem":
            need.append("netem")
        return [k for k in dict.fromkeys(need) if not getattr(self, k)]


def how_to_get(kinds: list[str], kernel: str) -> str:
    """The one-line remedy for missing qdiscs on common distributions."""
    mods = " ".join(f"sch_{k}" for k in kinds)
    return (f"kernel {kernel} lacks {mods}: on Debian install and boot linux-image-amd64 or "
            f"linux-image-cloud-amd64; on Ubuntu install linux-modules-extra-{kernel}; on Fedora "
            f"kernel-modules-extra; then `modprobe -a {mods}`. "
            "Rate-only profiles work without netem (htb/tbf).")


def _what_needs_netem(d: Direction) -> str:
    names = [name for name, on in (("delay", d.delay_s), ("jitter", d.jitter_s), ("loss", d.loss),
                                   ("duplicate", d.duplicate), ("corrupt", d.corrupt), ("reorder", d.reorder),
                                   ("slot", d.slot)) if on]
    return ", ".join(names) or "netem"


class Shaper:
    """Shapes the egress of one interface (``target``).

    Args:
        target: the interface and its namespace.
        arrangement: ``auto`` (= ``tbf``; ``htb`` with overhead), ``htb``, ``tbf`` or ``netem`` — see
            ``testbed.link.params``.
        state_dir: where the record of what we added lives (default
            ``/run/testbed/link`` or ``$TESTBED_STATE_DIR``).
        capabilities: skip probing (tests, or a caller that probed already).

    Thread-safe: the stepper changes the qdisc from its own thread.
    """

    def __init__(self, target: Target, *, arrangement: str = "auto", state_dir: str | Path | None = None,
                 capabilities: Capabilities | None = None, match_sport: int | None = None) -> None:
        self.target = target
        # one flow of a shared interface: an htb to classify, the tbf arrangement to shape
        self.match_sport = match_sport
        self.arrangement = "tbf" if match_sport is not None else arrangement
        # where the rate limiter and the leaf hang: (limiter handle, its parent, the leaf's parent)
        self._limiter, self._limiter_parent, self._leaf_parent = \
            (FLOW_TBF, CLASS, FLOW_CLASS) if match_sport is not None else (ROOT, TC_H_ROOT, CLASS)
        self.state_dir = state.state_dir(state_dir)
        self._caps = capabilities
        # One netlink socket per thread: pyroute2's IPRoute runs an event loop
        # bound to the thread that made it; used from another thread (the
        # stepper) each call is slower and jittery (median 6.4 vs 4.9 ms, spikes 36 ms).
        self._local = threading.local()
        self._all: list[netlink.Netlink] = []
        self._lock = threading.RLock()
        self.emulation: str | None = None
        self.profile_name: str | None = None
        # What this Shaper last installed: (root kind, leaf handle, root_before).
        # Lets change() skip dumping the interface (the stepper's steps: two
        # dumps were half of a change's time); stale -> one retry with a dump.
        self._layout: tuple[str, int | None, str | None] | None = None
        # The params and record last installed/written: a change re-sends only
        # what differs (a delay-only trace step is one netlink request).
        self._last: KernelParams | None = None
        self._last_record: tuple | None = None

    # --- plumbing -------------------------------------------------------------
    def _link(self) -> netlink.Netlink:
        nl = getattr(self._local, "nl", None)
        if nl is None:
            where = self.target
            if where.ingress:
                netlink.ifb_attach(where, where.ifb)
                where = where.egress_of_ifb()
            nl = self._local.nl = netlink.Netlink(where)
            self._all.append(nl)
        return nl

    def close(self) -> None:
        """Close the netlink sockets (qdiscs stay; use ``clear`` to remove them)."""
        with self._lock:
            for nl in self._all:
                nl.close()
            self._all.clear()
            self._local = threading.local()

    def __enter__(self) -> "Shaper":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- capabilities -----------------------------------------------------------
    def capabilities(self) -> Capabilities:
        """What this kernel can do. Tries ``modprobe sch_netem`` (and htb/tbf)
        first, then probes in a private namespace. Cached per Shaper."""
        if self._caps is None:
            self._caps = detect_capabilities()
        return self._caps

    def plan(self, direction: Direction) -> KernelParams:
        """Kernel parameters for ``direction``, or ShapingError naming what is
        missing and how to get it. Touches nothing."""
        try:
            params = kernel_params(direction, self.arrangement, self.capabilities().timer_slack_s)
        except ValueError as e:
            raise ShapingError(str(e), interface=str(self.target)) from None
        missing = self.capabilities().missing(params)
        if missing:
            why = f"this profile needs {', '.join(missing)}"
            if "netem" in missing:
                why += f" (for {_what_needs_netem(direction)})"
            raise ShapingError(f"{why}; refused before changing anything. "
                               + how_to_get(missing, self.capabilities().kernel), interface=str(self.target))
        return params

    # --- apply / change / clear -------------------------------------------------
    def apply(self, direction: Direction, profile: str | None = None) -> str:
        """Install ``direction`` on the interface; returns the emulation
        (``htb``, ``htb+netem``, ``tbf``, ``netem`` ...). If our root is already
        there this is a ``change``. Refuses an interface whose root qdisc was
        put there by someone else.

        Raises:
            ShapingError: before anything changed when the kernel or the
                interface cannot take it; after a partial install, having
                removed what it added.
        """
        with self._lock:
            params = self.plan(direction)
            nl = self._link()
            qdiscs = nl.qdiscs()
            root = _root_of(qdiscs)
            if root is not None and root["handle"] == ROOT:
                return self._change(params, profile, self._layout_of(qdiscs))
            if root is not None and root["handle"] != 0:
                raise ShapingError(f"the interface already has a root qdisc {root['kind']} "
                                   f"{handle_str(root['handle'])} that the testbed did not add; refusing to "
                                   "replace it", interface=str(self.target))
            before = root["kind"] if root else None
            state.write(self.target, self.state_dir, self._record(params, profile, before, "applying"))
            try:
                self._install(nl, params)
            except ShapingError:
                self._remove_ours(nl)
                state.remove(self.target, self.state_dir)
                raise
            state.write(self.target, self.state_dir, self._record(params, profile, before, "applied"))
            self.emulation, self.profile_name = params.emulation, profile
            self._layout = (self._root_kind(params), _leaf_handle(params), before)
            self._last, self._last_record = params, (params.root, params.emulation, profile, before)
            return params.emulation

    def change(self, direction: Direction, profile: str | None = None, *, resend: tuple[str, ...] = ()) -> str:
        """Change the installed shaping in place (the root qdisc stays).

        Only what differs from this Shaper's last install is sent; ``resend``
        (``"limiter"``, ``"leaf"``) sends those parts even when unchanged (the
        stepper's rehearsal of a step's cost).

        Raises:
            ShapingError: nothing of ours is installed, or the new direction
                needs a different root (change ``arrangement`` or clear+apply).
        """
        with self._lock:
            params = self.plan(direction)
            if self._layout is not None:
                try:
                    return self._change(params, profile, self._layout, resend)
                except ShapingError:
                    self._layout = self._last = None   # changed behind our back: look, then try once more
            qdiscs = self._link().qdiscs()
            root = _root_of(qdiscs)
            if root is None or root["handle"] != ROOT:
                raise ShapingError("nothing to change: the testbed's qdisc is not installed (apply first)",
                                   interface=str(self.target))
            return self._change(params, profile, self._layout_of(qdiscs))

    def clear(self) -> bool:
        """Remove what the shaper added (our root and its children) and the
        record. Returns True when a qdisc was removed. Leaves other roots alone."""
        with self._lock:
            self._layout = self._last = self._last_record = None
            if self.target.ingress:
                self.close()  # its socket is on the IFB, which goes now
                removed = netlink.ifb_detach(self.target, self.target.ifb)
            else:
                removed = self._remove_ours(self._link())
            state.remove(self.target, self.state_dir)
            self.emulation = self.profile_name = None
            return removed

    # --- reading back -----------------------------------------------------------
    def show(self) -> dict[str, Any]:
        """What the kernel has on the interface now (not what we remember)."""
        with self._lock:
            nl = self._link()
            qdiscs, classes = nl.qdiscs(), nl.classes()
        return describe(self.target, qdiscs, classes, state.read(self.target, self.state_dir))

    # --- internals --------------------------------------------------------------
    def _record(self, params: KernelParams, profile: str | None, before: str | None, status: str) -> dict:
        return {"root_handle": handle_str(ROOT), "root": params.root, "emulation": params.emulation,
                "arrangement": self.arrangement, "profile": profile, "root_before": before,
                "status": status, "time": time.time(), "pid": os.getpid()}

    def _install(self, nl: netlink.Netlink, p: KernelParams) -> None:
        if p.root == "netem":
            nl.netem(ROOT, TC_H_ROOT, p.netem)
            return
        if self.match_sport is not None:
            from testbed.link.params import PASS_THROUGH_BPS, burst_bytes

            line = PASS_THROUGH_BPS // 8
            nl.htb_root(ROOT, default_minor=2)
            for cls in (CLASS, OTHERS):
                nl.htb_class(cls, ROOT, line, burst_bytes(line, self.capabilities().timer_slack_s), 0)
            nl.sport_filter(ROOT, self.match_sport, CLASS)
            nl.tbf(FLOW_TBF, CLASS, p.rate_Bps, p.burst_bytes, p.queue_packets * MTU_BYTES)
        elif p.root == "htb":
            nl.htb_root(ROOT, default_minor=1)
            nl.htb_class(CLASS, ROOT, p.rate_Bps, p.burst_bytes, p.overhead_bytes)
        else:
            nl.tbf(ROOT, TC_H_ROOT, p.rate_Bps, p.burst_bytes, p.queue_packets * MTU_BYTES)
        self._set_leaf(nl, p, current=None)

    def _set_leaf(self, nl: netlink.Netlink, p: KernelParams, current: int | None) -> None:
        """Put the right leaf under the limiter (7462:1; 7465:1 for one flow): change it
        when it is the right kind, graft a new one otherwise (the old leaf goes in the
        same operation)."""
        parent = self._leaf_parent
        if p.netem is not None:
            if current == NETEM_LEAF:
                nl.netem(NETEM_LEAF, parent, p.netem, command="change")
            else:
                nl.netem(NETEM_LEAF, parent, p.netem, command="replace")
        elif current == PFIFO_LEAF:
            nl.pfifo(PFIFO_LEAF, parent, p.queue_packets, command="change")
        else:
            nl.pfifo(PFIFO_LEAF, parent, p.queue_packets, command="replace")

    def _root_kind(self, p: KernelParams) -> str:
        """The root qdisc ``p`` is installed under (htb classifies for one flow)."""
        return "htb" if self.match_sport is not None else p.root

    def _layout_of(self, qdiscs: list[dict]) -> tuple[str, int | None, str | None]:
        """(root kind, handle of the leaf, root_before) from a dump."""
        root = _root_of(qdiscs)
        leaf = next((q["handle"] for q in qdiscs if q["parent"] == self._leaf_parent), None)
        return (root["kind"] if root else "", leaf, self._state_root_before())

    def _state_root_before(self) -> str | None:
        return (state.read(self.target, self.state_dir) or {}).get("root_before")

    def parts_differing(self, a: Direction, b: Direction) -> tuple[str, ...]:
        """Which parts (``"limiter"``, ``"leaf"``) a change from ``a`` to ``b`` sends."""
        pa, pb = self.plan(a), self.plan(b)
        out = []
        if _limiter(pa) != _limiter(pb):
            out.append("limiter")
        if pa.netem != pb.netem or _limiter(pa) != _limiter(pb) or _leaf_handle(pa) != _leaf_handle(pb):
            out.append("leaf")
        return tuple(out)

    def _change(self, p: KernelParams, profile: str | None, layout: tuple[str, int | None, str | None],
                resend: tuple[str, ...] = ()) -> str:
        nl = self._link()
        root_kind, leaf, before = layout
        if root_kind != self._root_kind(p):
            raise ShapingError(f"cannot change in place: installed root is {root_kind}, this direction "
                               f"needs {p.root} (arrangement {self.arrangement}); clear and apply instead",
                               interface=str(self.target))
        last = self._last if self._layout is layout else None   # trust it only with our own layout
        if p.root == "netem":
            if last is None or last.netem != p.netem or "leaf" in resend:
                nl.netem(ROOT, TC_H_ROOT, p.netem, command="change")
        else:
            same_limiter = last is not None and _limiter(last) == _limiter(p) and "limiter" not in resend
            if not same_limiter:
                if p.root == "htb":
                    nl.htb_class(CLASS, ROOT, p.rate_Bps, p.burst_bytes, p.overhead_bytes, command="change-class")
                else:
                    nl.tbf(self._limiter, self._limiter_parent, p.rate_Bps, p.burst_bytes,
                           p.queue_packets * MTU_BYTES, command="change")
            if (last is None or last.netem != p.netem or not same_limiter or leaf != _leaf_handle(p)
                    or "leaf" in resend):
                self._set_leaf(nl, p, current=leaf)
        self._layout, self._last = (self._root_kind(p), _leaf_handle(p), before), p
        record = (p.root, p.emulation, profile, before)
        if record != self._last_record:   # the record says what is installed; a trace step rarely changes it
            state.write(self.target, self.state_dir, self._record(p, profile, before, "applied"))
            self._last_record = record
        self.emulation, self.profile_name = p.emulation, profile
        return p.emulation

    def _remove_ours(self, nl: netlink.Netlink) -> bool:
        root = nl.root()
        if root is None or root["handle"] != ROOT:
            return False
        try:
            nl.delete_root(ROOT)
        except ShapingError as e:
            if e.errno not in (2, 22):  # already gone
                raise
            return False
        return True

    @staticmethod
    def clear_recorded(state_dir: str | Path | None = None) -> list[str]:
        """Cleanup after a crashed run: for every record, remove our root qdisc
        if the interface (and its namespace) still exists. Returns what was
        removed, as ``"dev in netns X"`` strings."""
        folder = state.state_dir(state_dir)
        removed = []
        for target, record in state.records(folder):
            inode = record.get("netns_inode")
            if target.pid is not None and inode is not None and target.namespace_inode() != inode:
                state.remove(target, folder)   # the pid is gone or reused: its namespace went with it
                continue
            try:
                with Shaper(target, state_dir=folder, capabilities=Capabilities(False, True, True)) as s:
                    if s.clear():
                        removed.append(str(target))
            except ShapingError:
                state.remove(target, folder)   # interface or namespace gone: so are its qdiscs
        return removed


def _root_of(qdiscs: list[dict]) -> dict | None:
    return next((q for q in qdiscs if q["parent"] == TC_H_ROOT), None)


def _limiter(p: KernelParams) -> tuple:
    return (p.rate_Bps, p.burst_bytes, p.overhead_bytes, p.queue_packets)


def _leaf_handle(p: KernelParams) -> int | None:
    if p.root == "netem":
        return None
    return NETEM_LEAF if p.netem is not None else PFIFO_LEAF


def detect_capabilities() -> Capabilities:
    """Load the modules if possible, then probe which qdiscs the kernel takes
    and how late its timers fire (``timer_slack``)."""
    for module in ("sch_netem", "sch_htb", "sch_tbf"):
        netlink.modprobe(module)
    kinds = netlink.probe_kinds()
    return Capabilities(netem=kinds["netem"], htb=kinds["htb"], tbf=kinds["tbf"], kernel=platform.release(),
                        timer_slack_s=timer_slack())


_PR_SET_TIMERSLACK, _PR_GET_TIMERSLACK = 29, 30


def timer_slack(samples: int = 150, nap_s: float = 0.0005) -> float:
    """How much token-bucket slack (seconds) this kernel's timers need:
    3 x the median lateness of short sleeps, within [0.25 ms, 4 ms].

    A rate limiter's bucket loses the tokens that accrue while its watchdog
    timer fires late (``params.burst_bytes``). Bare metal / a VM with KVM
    wakes within ~25 us (-> the 0.25 ms floor); QEMU TCG wakes a
    millisecond or more late, and there a one-MTU bucket delivered only
    0.78-0.90 of the rate. The median (not a tail) keeps a busy host's
    scheduling spikes out; the user-space timer slack (50 us by default) is
    set to 1 ns while measuring because the kernel's qdisc timers have none.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    old = libc.prctl(_PR_GET_TIMERSLACK, 0, 0, 0, 0)
    if old > 0:
        libc.prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
    try:
        late = []
        for _ in range(samples):
            t = time.perf_counter()
            time.sleep(nap_s)
            late.append(time.perf_counter() - t - nap_s)
    finally:
        if old > 0:
            libc.prctl(_PR_SET_TIMERSLACK, old, 0, 0, 0)
    return min(MAX_TIMER_SLACK_S, max(TIMER_SLACK_S, 3 * statistics.median(late)))


def describe(target: Target, qdiscs: list[dict], classes: list[dict], record: dict | None) -> dict[str, Any]:
    """Summarise dumped qdiscs/classes: is ours installed, the emulation and
    the effective rate/delay/loss as the kernel holds them."""
    root = next((q for q in qdiscs if q["parent"] == TC_H_ROOT), None)
    out: dict[str, Any] = {"target": str(target), "ours": bool(root and root["handle"] == ROOT),
                           "root": root and {"kind": root["kind"], "handle": handle_str(root["handle"])},
                           "qdiscs": [{**q, "handle": handle_str(q["handle"]), "parent": handle_str(q["parent"])}
                                      for q in qdiscs],
                           "classes": [{**c, "handle": handle_str(c["handle"]), "parent": handle_str(c["parent"])}
                                       for c in classes],
                           "record": record, "emulation": None, "rate_bps": None, "delay_s": None}
    if not out["ours"]:
        return out
    netem = next((q for q in qdiscs if q["kind"] == "netem" and q["handle"] in (ROOT, NETEM_LEAF)), None)
    if root["kind"] == "htb":
        cls = next((c for c in classes if c["handle"] == CLASS), None)
        if cls and "options" in cls:
            out["rate_bps"] = cls["options"]["rate_Bps"] * 8
    elif root["kind"] == "tbf":
        out["rate_bps"] = root.get("options", {}).get("rate_Bps", 0) * 8 or None
    elif netem and "rate" in netem.get("options", {}):
        out["rate_bps"] = netem["options"]["rate"]["rate"] * 8
    from testbed.link.params import PASS_THROUGH_BPS

    pass_through = out["rate_bps"] is not None and out["rate_bps"] >= PASS_THROUGH_BPS * 0.99
    if root["kind"] == "netem":
        out["emulation"] = "netem"
    elif netem is not None:
        out["emulation"] = "netem" if pass_through else f"{root['kind']}+netem"
    else:
        out["emulation"] = root["kind"]
    if pass_through:
        out["rate_bps"] = None
    if netem is not None and "undecoded" not in netem.get("options", {}):
        o = netem["options"]
        out["delay_s"] = o["latency_ns"] / 1e9
        out["jitter_s"] = o["jitter_ns"] / 1e9
        out["loss_pct"] = o["loss"] / (2**32 - 1) * 100
        out["limit_packets"] = o["limit"]
    return out
