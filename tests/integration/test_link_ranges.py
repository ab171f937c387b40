"""The ends of every range ``testbed.link.params`` accepts are installed by this kernel.

Real namespaces, veth and qdiscs (``tests.integration.linknet``, unique names,
removed at teardown). The unit tests prove the extremes encode; this proves
the kernel takes them and reads them back, so "accepted at load time" means
"installable", for the rate limiter this kernel has (tbf, htb) and, on a
netem kernel, for netem's delays, jitter, slots and limit.
"""

from __future__ import annotations

import os

import pytest

from testbed.link.profile import (
    MAX_DELAY_S,
    MAX_JITTER_S,
    MAX_LIMIT_PACKETS,
    MAX_OVERHEAD_BYTES,
    MAX_RATE_BPS,
    MAX_SLOT_COUNT,
    MIN_RATE_BPS,
    Direction,
    Slot,
)
from testbed.link.shaper import Shaper, detect_capabilities
from testbed.link.target import Target
from tests.integration.linknet import veth_pair

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and qdiscs")]


@pytest.fixture(scope="module")
def caps():
    return detect_capabilities()


@pytest.mark.parametrize("arrangement", ["tbf", "htb"])
def test_rate_and_queue_extremes_install(tmp_path, caps, arrangement):
    with veth_pair() as pair:
        with Shaper(Target(pair.dev_a, netns=pair.ns_a), arrangement=arrangement, state_dir=tmp_path,
                    capabilities=caps) as s:
            extra = {"overhead_bytes": MAX_OVERHEAD_BYTES} if arrangement == "htb" else {}
            for rate in (MIN_RATE_BPS, MAX_RATE_BPS):
                s.apply(Direction(rate_bps=rate, limit_packets=MAX_LIMIT_PACKETS, **extra))
                shown = s.show()
                # read the kernel's own numbers (show() reports >= 32 Gbit/s as "no limit")
                held = [q["options"]["rate_Bps"] for q in shown["qdiscs"] if q["kind"] == "tbf"] + \
                       [c["options"]["rate_Bps"] for c in shown["classes"] if c["kind"] == "htb"]
                assert shown["ours"] and held == [rate // 8]
            s.clear()


def test_netem_extremes_install(tmp_path, caps):
    if not caps.netem:
        pytest.skip("this kernel has no sch_netem (the VM tier has)")
    with veth_pair() as pair:
        with Shaper(Target(pair.dev_a, netns=pair.ns_a), state_dir=tmp_path, capabilities=caps) as s:
            s.apply(Direction(rate_bps=MAX_RATE_BPS, delay_s=MAX_DELAY_S, jitter_s=MAX_JITTER_S,
                              slot=Slot(min_delay_s=MAX_DELAY_S, packets=MAX_SLOT_COUNT, bytes_=MAX_SLOT_COUNT)))
            shown = s.show()
            assert shown["delay_s"] == pytest.approx(MAX_DELAY_S) and shown["jitter_s"] == pytest.approx(MAX_JITTER_S)
            s.clear()
