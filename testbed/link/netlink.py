"""Every pyroute2 (netlink) call of the link layer, and nothing else.

Owns: opening an rtnetlink socket in the target's network namespace (host,
``/run/netns/NAME`` or ``/proc/PID/ns/net``), looking the interface up, and
the qdisc/class operations the shaper composes: htb root + class, tbf, pfifo,
netem (encoded here, because pyroute2's netem plugin cannot express
Gilbert-Elliott / 4-state loss, slots, 64-bit delays or distribution tables),
dumping qdiscs/classes back into plain dicts, deleting the root, probing which
qdisc kinds the kernel knows (in a private throw-away namespace), and
``modprobe``. Library errors become ``ShapingError`` here, once.

Leaves to others: what to install (``testbed.link.params``), in which order and
when (``testbed.link.shaper``).
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import os
import secrets
import socket
import struct
import subprocess
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, nla
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_NEWQDISC, TC_H_ROOT
from pyroute2.netlink.rtnl.tcmsg import tcmsg
from pyroute2.netlink.rtnl.tcmsg.common import tick_in_usec

from testbed.errors import ShapingError
from testbed.forksafe import configure_pyroute2
from testbed.link import distributions
from testbed.link.params import NetemOptions
from testbed.link.target import Target

TC_H_UNSPEC = 0

configure_pyroute2()  # its forked namespace helpers must not run our signal handlers


def handle(major: int, minor: int = 0) -> int:
    """tc's ``major:minor`` as one 32-bit integer."""
    return (major << 16) | minor


def handle_str(value: int) -> str:
    """0x74620001 → '7462:1' (tc's notation, hex)."""
    if value == TC_H_ROOT:
        return "root"
    return f"{value >> 16:x}:{value & 0xFFFF:x}"


# --- netem encoding -----------------------------------------------------------

def _own_nla_table(cls: type) -> type:
    """Give a pyroute2 message class its own compiled-attribute cache.

    Trap: pyroute2 caches the compiled ``nla_map`` in *class* attributes
    (``nlmsg_base.__compiled_nla`` / ``__t_nla_map`` / ``__r_nla_map``), and
    a subclass inherits them. Once IPRoute has compiled ``tcmsg`` (any qdisc
    dump does), a subclass of it skips compiling its own map and silently
    encodes with tcmsg's: our netem TCA_OPTIONS then went out through
    pyroute2's netem plugin, which sent the delay table under a wrong
    attribute (kernel: EINVAL) and dropped TCA_NETEM_LOSS (Gilbert-Elliott
    "applied" with no loss). Seen only on a netem kernel, only after a dump.
    Applied to every class here, nested ones included."""
    for attr in ("compiled_nla", "t_nla_map", "r_nla_map", "compiled_ft"):
        setattr(cls, f"_nlmsg_base__{attr}", False if attr.startswith("compiled") else None)
    for inner in vars(cls).values():
        if isinstance(inner, type) and issubclass(inner, nla) and inner is not cls:
            _own_nla_table(inner)
    return cls


@_own_nla_table
class _NetemOptions(nla):
    """``struct tc_netem_qopt`` followed by netem's attributes (linux/pkt_sched.h)."""

    fields = (("delay", "I"), ("limit", "I"), ("loss", "I"), ("gap", "I"), ("duplicate", "I"), ("jitter", "I"))
    nla_map = (
        ("TCA_NETEM_UNSPEC", "none"),
        ("TCA_NETEM_CORR", "netem_corr"),
        ("TCA_NETEM_DELAY_DIST", "cdata"),
        ("TCA_NETEM_REORDER", "netem_pair"),
        ("TCA_NETEM_CORRUPT", "netem_pair"),
        ("TCA_NETEM_LOSS", "netem_loss"),
        ("TCA_NETEM_RATE", "netem_rate"),
        ("TCA_NETEM_ECN", "uint32"),
        ("TCA_NETEM_RATE64", "uint64"),
        ("TCA_NETEM_PAD", "hex"),
        ("TCA_NETEM_LATENCY64", "int64"),
        ("TCA_NETEM_JITTER64", "int64"),
        ("TCA_NETEM_SLOT", "netem_slot"),
        ("TCA_NETEM_SLOT_DIST", "cdata"),
        ("TCA_NETEM_PRNG_SEED", "uint64"),
    )

    class netem_corr(nla):
        fields = (("delay_corr", "I"), ("loss_corr", "I"), ("dup_corr", "I"))

    class netem_pair(nla):
        fields = (("probability", "I"), ("correlation", "I"))

    class netem_rate(nla):
        fields = (("rate", "I"), ("packet_overhead", "i"), ("cell_size", "I"), ("cell_overhead", "i"))

    class netem_slot(nla):
        fields = (("min_delay", "q"), ("max_delay", "q"), ("max_packets", "i"), ("max_bytes", "i"),
                  ("dist_delay", "q"), ("dist_jitter", "q"))

    class netem_loss(nla):
        nla_map = (("NETEM_LOSS_UNSPEC", "none"), ("NETEM_LOSS_GI", "gi"), ("NETEM_LOSS_GE", "ge"))

        class gi(nla):
            fields = (("p13", "I"), ("p31", "I"), ("p32", "I"), ("p14", "I"), ("p23", "I"))

        class ge(nla):
            fields = (("p", "I"), ("r", "I"), ("h", "I"), ("k1", "I"))


@_own_nla_table
class _NetemTcmsg(tcmsg):
    """A tcmsg whose TCA_OPTIONS is always our netem encoding."""

    nla_map = (
        ("TCA_UNSPEC", "none"),
        ("TCA_KIND", "asciiz"),
        ("TCA_OPTIONS", "netem_options"),
        ("TCA_STATS", "stats"),
        ("TCA_XSTATS", "hex"),
        ("TCA_RATE", "hex"),
        ("TCA_FCNT", "hex"),
        ("TCA_STATS2", "hex"),
        ("TCA_STAB", "hex"),
    )
    netem_options = _NetemOptions


def _ticks(ns: int) -> int:
    # The 32-bit qopt fields are in psched ticks; the kernel prefers the
    # 64-bit nanosecond attributes when present (sch_netem.c netem_change).
    return min(int(ns / 1000 * tick_in_usec), 2**32 - 1)


def netem_attrs(o: NetemOptions) -> dict[str, Any]:
    """The TCA_OPTIONS value for ``o`` (pure; unit-tested by round trip)."""
    attrs: list[list[Any]] = []
    if o.delay_corr or o.loss_corr or o.dup_corr:
        attrs.append(["TCA_NETEM_CORR", {"delay_corr": o.delay_corr, "loss_corr": o.loss_corr,
                                         "dup_corr": o.dup_corr}])
    if o.distribution:
        table = distributions.table(o.distribution)
        attrs.append(["TCA_NETEM_DELAY_DIST", struct.pack(f"={len(table)}h", *table)])
    if o.reorder_prob:
        attrs.append(["TCA_NETEM_REORDER", {"probability": o.reorder_prob, "correlation": o.reorder_corr}])
    if o.corrupt_prob:
        attrs.append(["TCA_NETEM_CORRUPT", {"probability": o.corrupt_prob, "correlation": o.corrupt_corr}])
    if o.gemodel is not None:
        p, r, h, k1 = o.gemodel
        attrs.append(["TCA_NETEM_LOSS", {"attrs": [["NETEM_LOSS_GE", {"p": p, "r": r, "h": h, "k1": k1}]]}])
    if o.gimodel is not None:
        p13, p31, p32, p14, p23 = o.gimodel
        attrs.append(["TCA_NETEM_LOSS", {"attrs": [["NETEM_LOSS_GI", {"p13": p13, "p31": p31, "p32": p32,
                                                                      "p14": p14, "p23": p23}]]}])
    if o.rate_Bps:
        attrs.append(["TCA_NETEM_RATE", {"rate": min(o.rate_Bps, 2**32 - 1), "packet_overhead": o.packet_overhead,
                                         "cell_size": 0, "cell_overhead": 0}])
        if o.rate_Bps >= 2**32 - 1:
            attrs.append(["TCA_NETEM_RATE64", o.rate_Bps])
    attrs.append(["TCA_NETEM_LATENCY64", o.latency_ns])
    attrs.append(["TCA_NETEM_JITTER64", o.jitter_ns])
    if o.slot is not None:
        lo, hi, packets, nbytes = o.slot
        attrs.append(["TCA_NETEM_SLOT", {"min_delay": lo, "max_delay": hi, "max_packets": packets,
                                         "max_bytes": nbytes, "dist_delay": 0, "dist_jitter": 0}])
    return {"delay": _ticks(o.latency_ns), "limit": o.limit, "loss": o.loss, "gap": o.gap,
            "duplicate": o.duplicate, "jitter": _ticks(o.jitter_ns), "attrs": attrs}


def encode_netem(index: int, handle_: int, parent: int, o: NetemOptions) -> _NetemTcmsg:
    """The RTM_NEWQDISC message body for a netem qdisc (not sent)."""
    msg = _NetemTcmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"], msg["handle"], msg["parent"] = index, handle_, parent
    msg["attrs"] = [["TCA_KIND", "netem"], ["TCA_OPTIONS", netem_attrs(o)]]
    return msg


def _decode_netem(msg: Any) -> dict[str, Any]:
    """Re-read a dumped netem qdisc with our attribute map (pyroute2's stops at RATE)."""
    ours = _NetemTcmsg(data=msg.data, offset=msg.offset)
    ours.decode()
    opts = ours.get_attr("TCA_OPTIONS")
    out: dict[str, Any] = {k: opts[k] for k in ("limit", "loss", "gap", "duplicate")}
    out["latency_ns"] = opts.get_attr("TCA_NETEM_LATENCY64")
    out["jitter_ns"] = opts.get_attr("TCA_NETEM_JITTER64")
    if out["latency_ns"] is None:
        out["latency_ns"] = int(opts["delay"] / tick_in_usec * 1000)
        out["jitter_ns"] = int(opts["jitter"] / tick_in_usec * 1000)
    for name, key in (("TCA_NETEM_CORR", "corr"), ("TCA_NETEM_REORDER", "reorder"),
                      ("TCA_NETEM_CORRUPT", "corrupt"), ("TCA_NETEM_RATE", "rate"), ("TCA_NETEM_SLOT", "slot")):
        value = opts.get_attr(name)
        if value is not None:
            out[key] = {k: v for k, v in value.items() if k not in ("attrs", "header", "value")}
    loss = opts.get_attr("TCA_NETEM_LOSS")
    if loss is not None:
        for name, key in (("NETEM_LOSS_GE", "gemodel"), ("NETEM_LOSS_GI", "gimodel")):
            value = loss.get_attr(name)
            if value is not None:
                out[key] = {k: v for k, v in value.items() if k not in ("attrs", "header", "value")}
    return out


# --- the socket ---------------------------------------------------------------

def _wrap(e: Exception, target: Target, what: str) -> ShapingError:
    code = getattr(e, "code", None) or getattr(e, "errno", None)
    reason = os.strerror(code) if isinstance(code, int) and code > 0 else str(e)
    return ShapingError(f"{what} failed: {reason}", interface=str(target), errno=code)


ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD  # the ethertypes a filter matches


class Netlink:
    """An rtnetlink socket in ``target``'s namespace, bound to its interface.

    Use as a context manager or call ``close()``. Not thread-safe: one per thread.
    """

    def __init__(self, target: Target) -> None:
        self.target = target
        try:
            # flags=0: never create a namespace that is not there (pyroute2's
            # default O_CREAT would silently make an empty one).
            self._ipr = IPRoute(netns=target.netns_path, flags=0) if target.netns_path else IPRoute()
        except (OSError, NetlinkError) as e:
            raise ShapingError(f"cannot enter the network namespace ({e})", interface=str(target),
                               errno=getattr(e, "errno", None)) from e
        # pyroute2 0.9.7's synchronous nlm_request() reads status['nlm_generator'],
        # which IPRoute never sets (KeyError); False = return a tuple.
        self._ipr.asyncore.status.setdefault("nlm_generator", False)
        try:
            found = self._ipr.link_lookup(ifname=target.dev)
        except NetlinkError as e:
            self.close()
            raise _wrap(e, target, "interface lookup") from e
        if not found:
            self.close()
            raise ShapingError("no such interface", interface=str(target), errno=errno_mod.ENODEV)
        self.index: int = found[0]

    def close(self) -> None:
        self._ipr.close()

    def __enter__(self) -> "Netlink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._ipr.tc(*args, **kwargs)
        except NetlinkError as e:
            raise _wrap(e, self.target, what) from e

    # --- reading ----------------------------------------------------------
    def qdiscs(self) -> list[dict[str, Any]]:
        """Every qdisc on the interface: kind, handle, parent, options."""
        try:
            msgs = self._ipr.get_qdiscs(index=self.index)
        except NetlinkError as e:
            raise _wrap(e, self.target, "reading qdiscs") from e
        return [_qdisc_dict(m) for m in msgs if m["index"] == self.index]

    def classes(self) -> list[dict[str, Any]]:
        """Every class on the interface (htb rates etc.)."""
        try:
            msgs = self._ipr.get_classes(index=self.index)
        except NetlinkError as e:
            raise _wrap(e, self.target, "reading classes") from e
        return [_class_dict(m) for m in msgs if m["index"] == self.index]

    def root(self) -> dict[str, Any] | None:
        """The root qdisc, or None when the interface has none listed."""
        for q in self.qdiscs():
            if q["parent"] == TC_H_ROOT:
                return q
        return None

    def interface_state(self) -> dict[str, Any]:
        """What ``clear`` must restore: root qdisc kind and the interface's flags/mtu."""
        link = self._ipr.get_links(self.index)[0]
        root = self.root()
        return {"root_kind": root["kind"] if root else None, "mtu": link.get_attr("IFLA_MTU"),
                "txqlen": link.get_attr("IFLA_TXQLEN")}

    # --- writing ----------------------------------------------------------
    def htb_root(self, handle_: int, default_minor: int, command: str = "add") -> None:
        self._call("adding htb root", command, "htb", self.index, handle=handle_, parent=TC_H_ROOT,
                   default=default_minor)

    def htb_class(self, classid: int, parent: int, rate_Bps: int, burst_bytes: int, overhead: int,
                  command: str = "add-class") -> None:
        """Add or change (``change-class``) an htb class with rate = ceil."""
        self._call("setting the htb class", command, "htb", self.index, handle=classid, parent=parent,
                   rate=rate_Bps, ceil=rate_Bps, burst=burst_bytes, cburst=burst_bytes, overhead=overhead)

    def tbf(self, handle_: int, parent: int, rate_Bps: int, burst_bytes: int, limit_bytes: int,
            command: str = "add") -> None:
        self._call("setting tbf", command, "tbf", self.index, handle=handle_, parent=parent,
                   rate=rate_Bps, burst=burst_bytes, limit=limit_bytes)

    def pfifo(self, handle_: int, parent: int, limit: int, command: str = "add") -> None:
        self._call("setting the pfifo leaf", command, "pfifo", self.index, handle=handle_, parent=parent,
                   limit=limit)

    def netem(self, handle_: int, parent: int, options: NetemOptions, command: str = "add") -> None:
        """``command``: add (exclusive create), change (must exist), replace (create or graft)."""
        flags = {"add": NLM_F_CREATE | NLM_F_EXCL, "change": NLM_F_REPLACE,
                 "replace": NLM_F_CREATE | NLM_F_REPLACE}[command]
        msg = encode_netem(self.index, handle_, parent, options)
        try:
            tuple(self._ipr.nlm_request(msg, msg_type=RTM_NEWQDISC, msg_flags=NLM_F_REQUEST | NLM_F_ACK | flags))
        except NetlinkError as e:
            raise _wrap(e, self.target, "setting netem") from e

    def sport_filter(self, parent: int, port: int, flowid: int) -> None:
        """u32 filters on ``parent``: TCP/UDP packets whose source port is ``port`` go to
        class ``flowid``; everything else to the qdisc's default class. The port is the
        upper half of the 32-bit word right after the IP header: 20 bytes into an IPv4
        header without options, 40 into an IPv6 header without extension headers."""
        for prio, (protocol, offset) in enumerate(((ETH_P_IP, 20), (ETH_P_IPV6, 40)), start=1):
            self._call("adding the source-port filter", "add-filter", "u32", self.index, parent=parent, prio=prio,
                       protocol=protocol, target=flowid, keys=[f"0x{port << 16:08x}/0xffff0000+{offset}"])

    def delete_root(self, handle_: int) -> None:
        """Delete the root qdisc with this handle (children go with it)."""
        self._call("deleting the root qdisc", "del", None, self.index, handle=handle_, parent=TC_H_ROOT)


def _plain(value: Any) -> Any:
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items() if k not in ("attrs", "header", "value")}
    return value


def _qdisc_dict(m: Any) -> dict[str, Any]:
    kind = m.get_attr("TCA_KIND")
    out: dict[str, Any] = {"kind": kind, "handle": m["handle"], "parent": m["parent"]}
    opts = m.get_attr("TCA_OPTIONS")
    if kind == "netem":
        try:
            out["options"] = _decode_netem(m)
        except Exception as e:  # a dump we cannot read must not hide the rest of the interface
            out["options"] = {"undecoded": repr(e)}
    elif kind == "tbf" and opts is not None:
        parms = opts.get_attr("TCA_TBF_PARMS")
        # buffer is the bucket in psched ticks at the rate: back to bytes for show().
        out["options"] = {"rate_Bps": parms["rate"], "limit_bytes": parms["limit"],
                          "burst_bytes": int(parms["buffer"] / tick_in_usec * parms["rate"] / 1e6)} if parms else {}
    elif kind == "pfifo" and opts is not None:
        out["options"] = {"limit": opts["limit"]}
    elif kind == "htb" and opts is not None:
        init = opts.get_attr("TCA_HTB_INIT")
        out["options"] = {"default": init["defcls"]} if init else {}
    stats = m.get_attr("TCA_STATS")
    if stats is not None:
        out["stats"] = {"bytes": stats["bytes"], "packets": stats["packets"], "drops": stats["drop"],
                        "overlimits": stats["overlimits"], "backlog": stats["backlog"]}
    return out


def _class_dict(m: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": m.get_attr("TCA_KIND"), "handle": m["handle"], "parent": m["parent"]}
    opts = m.get_attr("TCA_OPTIONS")
    if out["kind"] == "htb" and opts is not None:
        parms = opts.get_attr("TCA_HTB_PARMS")
        rate64 = opts.get_attr("TCA_HTB_RATE64")
        if parms is not None:
            out["options"] = {"rate_Bps": rate64 or parms["rate"], "ceil_Bps": opts.get_attr("TCA_HTB_CEIL64")
                              or parms["ceil"], "overhead": parms["rate_overhead"]}
    return out


# --- what the kernel can do ---------------------------------------------------

def modprobe(module: str) -> bool:
    """Try to load a kernel module; True when modprobe succeeded."""
    try:
        return subprocess.run(["modprobe", "-q", module], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def probe_kinds() -> dict[str, bool]:
    """Which of netem, htb, tbf the kernel accepts, tried on ``lo`` of a
    private namespace made for this and removed after (nothing of the
    user's is touched). A kind the kernel does not know fails with ENOENT."""
    name = f"tbprobe{secrets.token_hex(3)}"
    try:
        pr_netns.create(name)
    except OSError as e:
        raise ShapingError(f"cannot create a namespace to probe qdiscs: {e.strerror} (needs root)",
                           errno=e.errno) from e
    try:
        with Netlink(Target("lo", netns=name)) as nl:
            found = {}
            trials = {
                "htb": lambda: nl.htb_root(handle(1), 1),
                "tbf": lambda: nl.tbf(handle(1), TC_H_ROOT, 125_000, 3000, 30_000),
                "netem": lambda: nl.netem(handle(1), TC_H_ROOT, NetemOptions(latency_ns=1_000_000)),
            }
            for kind, trial in trials.items():
                try:
                    trial()
                    found[kind] = True
                    nl.delete_root(handle(1))
                except ShapingError as e:
                    # Only "unknown qdisc kind" (ENOENT) means missing; EINVAL
                    # would be a bad encoding of ours and must surface, not
                    # masquerade as a kernel without netem.
                    if e.errno not in (errno_mod.ENOENT, errno_mod.EOPNOTSUPP):
                        raise
                    found[kind] = False
            return found
    finally:
        try:
            pr_netns.remove(name)
        except OSError:
            pass


# --- ingress through an IFB device ----------------------------------------------

INGRESS = 0xFFFF0000  # the ingress qdisc's handle (ffff:) and the parent of its filters
_ETH_P_ALL = 0x0003


def _ipr_in(target: Target) -> IPRoute:
    try:
        ipr = IPRoute(netns=target.netns_path, flags=0) if target.netns_path else IPRoute()
    except (OSError, NetlinkError) as e:
        raise ShapingError(f"cannot enter the network namespace ({e})", interface=str(target),
                           errno=getattr(e, "errno", None)) from e
    ipr.asyncore.status.setdefault("nlm_generator", False)
    return ipr


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def ifb_attach(target: Target, ifb: str) -> None:
    """Make ``ifb`` (an IFB device beside ``target.dev``, same namespace) carry
    everything ``target.dev`` receives: ``ingress`` qdisc on the device, one
    match-everything u32 filter redirecting every packet to the IFB's egress, where a shaper's
    qdiscs then act on it. Idempotent: an existing IFB and redirect are kept.
    A root ingress qdisc someone else installed is refused."""
    with contextlib.closing(_ipr_in(target)) as ipr:
        try:
            dev = _index(ipr, target.dev)
            if dev is None:
                raise ShapingError("no such interface", interface=str(target), errno=errno_mod.ENODEV)
            idx = _index(ipr, ifb)
            if idx is None:
                ipr.link("add", ifname=ifb, kind="ifb")
                idx = _index(ipr, ifb)
            ipr.link("set", index=idx, state="up")
            kinds = {m.get_attr("TCA_KIND") for m in ipr.get_qdiscs(index=dev)
                     if m["index"] == dev and m["parent"] == INGRESS_PARENT}
            if "ingress" not in kinds:
                ipr.tc("add", "ingress", dev, INGRESS)
            filters = [m for m in ipr.get_filters(index=dev, parent=INGRESS) if m["index"] == dev
                       and m.get_attr("TCA_KIND") == "u32"]
            if not filters:
                # u32 matching every packet, not matchall: cls_matchall is missing from
                # some kernels (this project's CI kernel among them), u32 is everywhere.
                ipr.tc("add-filter", "u32", dev, parent=INGRESS, prio=1, protocol=_ETH_P_ALL,
                       target=0x10001, keys=["0x0/0x0+0"],
                       action={"kind": "mirred", "direction": "egress", "action": "redirect",
                               "ifindex": idx})
        except NetlinkError as e:
            raise _wrap(e, target, f"redirecting ingress to {ifb}") from e


INGRESS_PARENT = 0xFFFFFFF1  # TC_H_INGRESS: where an ingress qdisc hangs


def ifb_detach(target: Target, ifb: str) -> bool:
    """Remove the ingress redirect from ``target.dev`` and delete ``ifb``. True when
    something was removed; an interface or namespace already gone is fine."""
    removed = False
    try:
        ipr = _ipr_in(target)
    except ShapingError:
        return False
    with contextlib.closing(ipr):
        dev = _index(ipr, target.dev)
        if dev is not None:
            try:
                ipr.tc("del", "ingress", dev, INGRESS)
                removed = True
            except NetlinkError:
                pass
        idx = _index(ipr, ifb)
        if idx is not None:
            try:
                ipr.link("del", index=idx)
                removed = True
            except NetlinkError:
                pass
    return removed

