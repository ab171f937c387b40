"""The link layer: profiles (``profile``), the pure profile → kernel-parameter
function (``params``), the kernel-facing netlink calls (``netlink``), the
shaper (``shaper``), time-varying traces (``trace``, ``stepper``).

Typical use (what the sweep does per node)::

    from testbed.link import Shaper, Target, load_profile
    profile = load_profile("ladder-10mbit")
    with Shaper(Target("eth0", pid=container_pid)) as s:
        emulation = s.apply(profile.uplink, profile.name)   # "tbf"
"""

from testbed.link.link import Link
from testbed.link.profile import Direction, LinkProfile, list_profiles, load_profile
from testbed.link.shaper import Capabilities, Shaper, detect_capabilities
from testbed.link.stepper import Stepper
from testbed.link.target import Target

__all__ = ["Capabilities", "Direction", "Link", "LinkProfile", "Shaper", "Stepper", "Target", "detect_capabilities",
           "list_profiles", "load_profile"]
