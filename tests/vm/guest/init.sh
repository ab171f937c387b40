#!/bin/sh
# Runs inside the guest as a child of /sbin/tb-init (PID 1), with the payload
# disk at /mnt/payload. Everything the checks print goes to out/guest.log and
# to the serial console; results go to out/results.json.
P=/mnt/payload/project
OUT=/mnt/payload/out
export PYTHONPATH=/opt/tbdeps:$P PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
echo "guest: kernel $(uname -r), $(nproc) cpu(s), $(python3 --version)"
python3 -m tests.vm.guest.checks --out "$OUT" 2>&1 | tee "$OUT/guest.log"
