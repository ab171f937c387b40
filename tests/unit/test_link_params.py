"""The pure profile-direction → kernel-parameters function, and netem's encoding."""

import struct

import pytest

from testbed.link import distributions
from testbed.link.netlink import _NetemTcmsg, encode_netem, netem_attrs
from testbed.link.params import NETEM_DEFAULT_LIMIT, PASS_THROUGH_BPS, kernel_params, netem_limit, u32
from testbed.link.profile import U32_MAX, Chance, Direction, FourState, GEModel, Loss, Reorder, Slot, check, needs_netem

pytestmark = pytest.mark.unit


def test_rate_only_uses_tbf_and_no_netem():
    p = kernel_params(Direction(rate_bps=10_000_000))
    assert (p.root, p.emulation, p.rate_Bps, p.netem) == ("tbf", "tbf", 1_250_000, None)
    assert p.burst_bytes == 312 + 1500 and p.queue_packets == 1000
    assert not needs_netem(Direction(rate_bps=1_000_000, limit_packets=5))


def test_rate_and_delay_is_limiter_plus_netem_child():
    p = kernel_params(Direction(rate_bps=25_000_000, delay_s=0.01, jitter_s=0.002, distribution="normal"))
    assert (p.root, p.emulation) == ("tbf", "tbf+netem")
    assert p.netem.latency_ns == 10_000_000 and p.netem.jitter_ns == 2_000_000
    assert p.netem.rate_Bps is None and p.netem.distribution == "normal"


def test_arrangement_override_and_overhead_picks_htb():
    assert kernel_params(Direction(rate_bps=8_000_000, delay_s=0.01), "netem").emulation == "netem"
    assert kernel_params(Direction(rate_bps=8_000_000, delay_s=0.01), "netem").netem.rate_Bps == 1_000_000
    assert kernel_params(Direction(rate_bps=8_000_000), "htb").emulation == "htb"
    p = kernel_params(Direction(rate_bps=8_000_000, overhead_bytes=24))
    assert (p.root, p.overhead_bytes) == ("htb", 24)
    with pytest.raises(ValueError, match="overhead"):
        kernel_params(Direction(rate_bps=8_000_000, overhead_bytes=24), "tbf")
    with pytest.raises(ValueError, match="arrangement must be one of"):
        kernel_params(Direction(rate_bps=1_000_000), "cake")


def test_delay_without_rate_is_reported_as_netem():
    p = kernel_params(Direction(delay_s=0.02))
    assert p.emulation == "netem" and p.rate_Bps == PASS_THROUGH_BPS // 8 < 2**32


def test_nothing_to_shape_is_refused():
    with pytest.raises(ValueError, match="nothing to shape"):
        kernel_params(Direction())


def test_netem_limit_is_sized_from_the_bdp():
    # 1 Gbit/s x 100 ms = 8334 full-size packets in flight; netem's 1000 would tail-drop.
    assert netem_limit(Direction(rate_bps=10**9, delay_s=0.1)) == 2 * 8334
    assert netem_limit(Direction(rate_bps=10**6, delay_s=0.01)) == NETEM_DEFAULT_LIMIT
    assert netem_limit(Direction(rate_bps=10**9, delay_s=0.1, limit_packets=50)) == 50


def test_probabilities_scale_to_u32():
    assert (u32(0), u32(100), u32(50)) == (0, U32_MAX, round(U32_MAX / 2))


def test_gilbert_elliott_maps_to_kernel_fields():
    d = Direction(delay_s=0.001, loss=Loss(gemodel=GEModel(p_pct=1, r_pct=30, one_minus_h_pct=100, one_minus_k_pct=0)))
    p, r, h, k1 = kernel_params(d).netem.gemodel
    # the kernel drops in the bad state when rnd > h: h = 1 - (1-h) = 0 means always
    assert (p, r, h, k1) == (u32(1), u32(30), 0, 0)


def test_four_state_defaults_follow_tc():
    d = Direction(loss=Loss(state=FourState(p13_pct=2)))
    assert kernel_params(d).netem.gimodel == (u32(2), u32(98), 0, 0, U32_MAX)


def test_reorder_gap_defaults_to_one_and_slot_converts():
    d = Direction(delay_s=0.01, reorder=Reorder(percent_pct=25, correlation_pct=50),
                  slot=Slot(min_delay_s=0.001, packets=32), duplicate=Chance(percent_pct=1),
                  corrupt=Chance(percent_pct=0.1))
    n = kernel_params(d).netem
    assert (n.gap, n.reorder_prob, n.reorder_corr) == (1, u32(25), u32(50))
    assert n.slot == (1_000_000, 1_000_000, 32, 0)
    assert n.duplicate == u32(1) and n.corrupt_prob == u32(0.1)


@pytest.mark.parametrize("d,words", [
    (Direction(jitter_s=0.001), "jitter needs delay"),
    (Direction(delay_s=0.01, loss=Loss(random_pct=0, correlation_pct=20)), "non-zero random loss"),
    (Direction(delay_s=0.01, loss=Loss(gemodel=GEModel(p_pct=1, r_pct=2), correlation_pct=5)), "random loss only"),
    (Direction(delay_s=0.01, duplicate=Chance(percent_pct=0, correlation_pct=5)), "duplicate correlation"),
    (Direction(rate_bps=1_000_000, reorder=Reorder(percent_pct=5)), "reordering needs delay"),
    (Direction(delay_s=0.01, delay_correlation_pct=10), "delay correlation needs jitter"),
])
def test_rules_between_fields(d, words):
    assert any(words in msg for _, msg in check(d))
    with pytest.raises(ValueError, match=words):
        kernel_params(d)


def test_netem_message_round_trips_with_every_attribute():
    d = Direction(rate_bps=8_000_000, delay_s=0.04, jitter_s=0.004, distribution="pareto", delay_correlation_pct=10,
                  loss=Loss(gemodel=GEModel(p_pct=1, r_pct=30)), reorder=Reorder(percent_pct=5),
                  slot=Slot(min_delay_s=0.001, max_delay_s=0.002, packets=8), corrupt=Chance(percent_pct=1))
    opts = kernel_params(d, "netem").netem
    msg = encode_netem(7, 0x74620000, 0xFFFFFFFF, opts)
    msg.encode()
    back = _NetemTcmsg(data=msg.data)
    back.decode()
    o = back.get_attr("TCA_OPTIONS")
    assert back.get_attr("TCA_KIND") == "netem" and back["handle"] == 0x74620000
    assert o["limit"] == opts.limit and o.get_attr("TCA_NETEM_LATENCY64") == 40_000_000
    assert o.get_attr("TCA_NETEM_JITTER64") == 4_000_000
    assert o.get_attr("TCA_NETEM_RATE")["rate"] == 1_000_000
    ge = o.get_attr("TCA_NETEM_LOSS").get_attr("NETEM_LOSS_GE")
    assert (ge["p"], ge["r"], ge["h"], ge["k1"]) == opts.gemodel
    slot = o.get_attr("TCA_NETEM_SLOT")
    assert (slot["min_delay"], slot["max_delay"], slot["max_packets"]) == (1_000_000, 2_000_000, 8)
    assert o.get_attr("TCA_NETEM_REORDER")["probability"] == u32(5)
    table = o.get_attr("TCA_NETEM_DELAY_DIST")
    assert struct.unpack(f"={len(table) // 2}h", table) == distributions.table("pareto")


def test_netem_attrs_without_options_send_only_the_delays():
    names = [a[0] for a in netem_attrs(kernel_params(Direction(delay_s=0.01)).netem)["attrs"]]
    assert names == ["TCA_NETEM_LATENCY64", "TCA_NETEM_JITTER64"]


def test_distribution_tables_have_iproute2_shape():
    normal = distributions.table("normal")
    assert len(normal) == 4096 and abs(normal[2048]) < 10 and normal[0] < -20000 and normal[-1] > 20000
    assert normal == tuple(sorted(normal))
    pareto = distributions.table("pareto")
    assert len(pareto) == 4096 and pareto[0] == 0 and max(pareto) == 32767
    assert len(distributions.table("paretonormal")) == 4096
    with pytest.raises(ValueError):
        distributions.table("uniform")


def test_describe_reads_emulation_rate_and_delay_from_dumped_qdiscs():
    from testbed.link.shaper import CLASS, NETEM_LEAF, ROOT, describe
    from testbed.link.target import Target

    root = 0xFFFFFFFF
    qdiscs = [{"kind": "tbf", "handle": ROOT, "parent": root, "options": {"rate_Bps": 3_125_000}},
              {"kind": "netem", "handle": NETEM_LEAF, "parent": CLASS,
               "options": {"latency_ns": 10_000_000, "jitter_ns": 2_000_000, "loss": u32(1), "limit": 1000}}]
    info = describe(Target("eth0"), qdiscs, [], None)
    assert info["ours"] and info["emulation"] == "tbf+netem" and info["rate_bps"] == 25_000_000
    assert info["delay_s"] == pytest.approx(0.01) and info["loss_pct"] == pytest.approx(1.0)
    assert info["qdiscs"][1]["handle"] == "7464:0" and info["qdiscs"][0]["parent"] == "root"
    # pass-through limiter (no rate in the profile): netem alone shapes
    qdiscs[0]["options"]["rate_Bps"] = PASS_THROUGH_BPS // 8
    info = describe(Target("eth0"), qdiscs, [], None)
    assert info["emulation"] == "netem" and info["rate_bps"] is None
    foreign = describe(Target("eth0"), [{"kind": "fq_codel", "handle": 0x10000, "parent": root}], [], None)
    assert not foreign["ours"] and foreign["emulation"] is None


def test_gemodel_bytes_match_what_tc_sends():
    # iproute2 6.1 `tc qdisc add ... netem loss gemodel 5% 30% 100% 0%`, captured
    # with strace: TCA_NETEM_LOSS { NETEM_LOSS_GE {p, r, h, k1} } with h = 1 - (1-h).
    tc_ge = bytes.fromhex("14000200" "cdcccc0c" "cccccc4c" "00000000" "00000000")
    d = Direction(loss=Loss(gemodel=GEModel(p_pct=5, r_pct=30, one_minus_h_pct=100, one_minus_k_pct=0)))
    msg = encode_netem(1, 0x74620000, 0xFFFFFFFF, kernel_params(d, "netem").netem)
    msg.encode()
    assert tc_ge in bytes(msg.data)


def test_burst_grows_with_the_kernels_timer_slack():
    from testbed.link.params import MAX_TIMER_SLACK_S, burst_bytes
    from testbed.link.profile import MTU_BYTES

    assert burst_bytes(625_000) == 156 + MTU_BYTES                    # 5 Mbit/s, 0.25 ms default
    assert burst_bytes(625_000, 0.004) == 2_500 + MTU_BYTES           # rate/HZ at HZ=250
    assert burst_bytes(625_000, 1.0) == int(625_000 * MAX_TIMER_SLACK_S) + MTU_BYTES   # capped
    assert kernel_params(Direction(rate_bps=5_000_000), timer_slack_s=0.002).burst_bytes == 1_250 + MTU_BYTES


def test_netem_encoding_survives_pyroute2_compiling_tcmsg_first():
    # Regression: pyroute2 caches compiled attribute maps in inherited class
    # attributes; after any qdisc dump compiled tcmsg, our tcmsg subclass
    # encoded with tcmsg's map (no delay table, no loss model). Needs a fresh
    # interpreter so tcmsg really is compiled before our class.
    import subprocess
    import sys

    code = (
        "from pyroute2.netlink.rtnl.tcmsg import tcmsg\n"
        "tcmsg()\n"  # what IPRoute does on its first qdisc dump
        "from testbed.link.netlink import encode_netem\n"
        "from testbed.link.params import NetemOptions\n"
        "m = encode_netem(1, 0x74620000, 0xFFFFFFFF, NetemOptions(latency_ns=40_000_000, jitter_ns=8_000_000,"
        " distribution='normal', gemodel=(5, 6, 0, 0)))\n"
        "m.encode()\n"
        "print(len(m.data))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) > 8192 + 20   # the 4096-entry table and the GE model are in the message


# --- kernel ranges: what passes check() encodes; one step beyond is refused by check() --------

def _encode(kind: str, **kw) -> None:
    """Pack a qdisc/class message as ``testbed.link.netlink`` has pyroute2 do it (no socket)."""
    import socket

    from pyroute2.netlink.rtnl.tcmsg import plugins, tcmsg

    msg = tcmsg()
    msg["family"], msg["index"], msg["handle"], msg["parent"] = socket.AF_UNSPEC, 1, 0x74620000, 0xFFFFFFFF
    opts = plugins[kind].get_class_parameters(kw) if kind == "htb" else plugins[kind].get_parameters(kw)
    msg["attrs"] = [["TCA_KIND", kind], ["TCA_OPTIONS", opts]]
    msg.encode()


def _install_encodes(d: Direction, arrangement: str = "auto") -> None:
    from testbed.link.params import MAX_TIMER_SLACK_S, TIMER_SLACK_S
    from testbed.link.profile import MTU_BYTES

    for slack in (TIMER_SLACK_S, MAX_TIMER_SLACK_S):
        p = kernel_params(d, arrangement, slack)
        if p.root == "tbf":
            _encode("tbf", rate=p.rate_Bps, burst=p.burst_bytes, limit=p.queue_packets * MTU_BYTES)
        elif p.root == "htb":
            _encode("htb", rate=p.rate_Bps, ceil=p.rate_Bps, burst=p.burst_bytes, cburst=p.burst_bytes,
                    overhead=p.overhead_bytes)
        _encode("pfifo", limit=p.queue_packets)
        if p.netem is not None:
            encode_netem(1, 0x74640000, 0x74620001, p.netem).encode()


def test_the_extremes_of_every_range_encode():
    from testbed.link.profile import (
        MAX_DELAY_S,
        MAX_JITTER_S,
        MAX_LIMIT_PACKETS,
        MAX_RATE_BPS,
        MAX_SLOT_COUNT,
        MIN_RATE_BPS,
    )

    for rate in (MIN_RATE_BPS, MAX_RATE_BPS):
        for arrangement in ("tbf", "htb", "netem"):
            d = Direction(rate_bps=rate, limit_packets=MAX_LIMIT_PACKETS)
            assert check(d) == []
            _install_encodes(d, arrangement)
    d = Direction(rate_bps=MAX_RATE_BPS, delay_s=MAX_DELAY_S, jitter_s=MAX_JITTER_S,
                  reorder=Reorder(percent_pct=1, gap=U32_MAX),
                  slot=Slot(min_delay_s=MAX_DELAY_S, max_delay_s=MAX_DELAY_S, packets=MAX_SLOT_COUNT,
                            bytes_=MAX_SLOT_COUNT))
    assert check(d) == []
    assert netem_limit(d) == U32_MAX          # 34 Gbit/s x an hour: clamped to netem's u32
    _install_encodes(d)
    _install_encodes(Direction(rate_bps=8_000_000, overhead_bytes=1024))   # htb


@pytest.mark.parametrize("d,field,words", [
    (Direction(rate_bps=63), "rate", "within 64bit and 34.35973836gbit"),
    (Direction(rate_bps=(2**32) * 8), "rate", "32-bit bytes/s"),
    (Direction(rate_bps=10**42), "rate", "got 1e+33gbit"),
    (Direction(delay_s=1e12), "delay", "within 0s and 3600s"),
    (Direction(delay_s=1.0, jitter_s=2.2), "jitter", "2^31-1 ns"),
    (Direction(rate_bps=10**6, limit_packets=2**40), "limit", "within 1 and 2863311"),
    (Direction(rate_bps=10**6, overhead_bytes=-20), "overhead", "within 0 and 1024"),
    (Direction(rate_bps=10**6, overhead_bytes=1025), "overhead", "within 0 and 1024"),
    (Direction(delay_s=0.01, slot=Slot(min_delay_s=1e15)), "slot.min_delay", "3600s"),
    (Direction(delay_s=0.01, slot=Slot(min_delay_s=0.001, packets=2**31)), "slot.packets", "2147483647"),
    (Direction(delay_s=0.01, slot=Slot(min_delay_s=0.001, bytes_=2**31)), "slot.bytes", "signed 32-bit"),
    (Direction(delay_s=0.01, reorder=Reorder(percent_pct=1, gap=2**32)), "reorder.gap", "32-bit"),
    (Direction(limit_packets=100), "limit", "give rate"),
])
def test_values_beyond_the_kernel_are_refused_by_check_with_the_range(d, field, words):
    problems = check(d)
    assert problems and ".".join(problems[0][0]) == field and words in problems[0][1], problems
    with pytest.raises(ValueError, match=field.split(".")[-1]):
        kernel_params(d)                      # and never reach the encoder
