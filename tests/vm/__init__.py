"""VM tier: a real sch_netem kernel booted under QEMU runs the project's shaper."""
