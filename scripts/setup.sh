#!/usr/bin/env bash
# One entry point for a fresh Debian 12 / Ubuntu 22.04+ machine, as root:
#   bash scripts/setup.sh run    install what is needed, then run the PoseNet sweep
#   bash scripts/setup.sh test   install what is needed, then run the whole test suite
# Safe to run again: every step checks before it acts.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
mode="${1:-}"
case "$mode" in
  run|test) ;;
  *) echo "usage: bash scripts/setup.sh run|test" >&2; exit 2 ;;
esac

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# Distribution packages: what the testbed drives (iproute2, docker, prometheus)
# and what the tests need (qemu + debootstrap + a netem kernel for tests/vm,
# iperf3 as the goodput reference, chromium to open the report).
APT_PACKAGES=(
  ca-certificates python3 python3-venv python3-pip git
  iproute2 iputils-ping iperf3 kmod nftables
  docker.io debootstrap
  prometheus prometheus-pushgateway
  adb
)
# tests/vm: qemu boots Debian's linux-image-cloud-amd64 (it has sch_netem); that
# kernel is installed *inside* the guest's debootstrap root file system by
# tests/vm/image.py (cached in ~/.cache/testbed/vm), not on this host, so the
# host's /boot and bootloader are never touched. e2fsprogs: mkfs.ext4 -d, debugfs.
# openssh-server: the edge host of tests/integration/test_ssh.py (its own sshd in a
# namespace; the system sshd is never started, see install_apt).
APT_TEST_PACKAGES=(
  qemu-system-x86 e2fsprogs chromium openssh-server
)

install_apt() {
  local wanted=("${APT_PACKAGES[@]}")
  [ "$mode" = test ] && wanted+=("${APT_TEST_PACKAGES[@]}")
  local missing=()
  for p in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    apt-get update -q
    # Packages must not start their services on install (openssh-server would start a
    # system sshd listening on every address): a policy-rc.d exiting 101 forbids it,
    # put there only for the install when the machine has none.
    local policy=/usr/sbin/policy-rc.d made_policy=""
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1
    fi
    # Installing a kernel image into a container/VM must not try to run bootloaders.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    [ -n "$made_policy" ] && rm -f "$policy"
    # Debian's packages start their own service on install; the testbed starts
    # its own Prometheus (testbed monitor up, the tests), so stop just those
    # services, never a Prometheus the user started by hand.
    for svc in prometheus prometheus-pushgateway; do
      case " ${missing[*]} " in
        *" $svc "*) service "$svc" stop >/dev/null 2>&1 || true ;;
      esac
    done
  fi
}

install_python() {
  if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    python3 -m venv .venv
  fi
  log "pip install -e .[test]"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e ".[test]"
}

start_dockerd() {
  if docker info >/dev/null 2>&1; then return; fi
  log "starting dockerd"
  mkdir -p /var/log
  nohup dockerd >/var/log/testbed-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && return
    sleep 1
  done
  echo "dockerd did not start; see /var/log/testbed-dockerd.log" >&2
  exit 1
}

# Node images: the base (python:3.11-slim when a registry answers, else Debian
# bookworm made offline by docker/build-base-image.sh) and the node image, tagged
# splitbed-node:<content hash> so this only builds when nodes/, the Dockerfile or
# the node's dependency ranges in pyproject.toml changed. --prune then removes
# older splitbed-node images: the current one, the one before it and any image a
# container (running or stopped) uses stay.
build_node_image() {
  log "node image (builds only when nodes/, docker/Dockerfile or pyproject's ranges changed; prunes old ones)"
  .venv/bin/python -m testbed.deploy.image --prune
}

install_apt
install_python
start_dockerd
build_node_image

export PATH="$here/.venv/bin:$PATH"
if [ "$mode" = run ]; then
  exec testbed run experiments/posenet_sweep.yaml
fi

log "ruff check (lint: pyflakes, pycodestyle, import order, bugbear)"
.venv/bin/ruff check .

# pytest exits 5 when it collected nothing: that is a failure here.
set +e
.venv/bin/python -m pytest tests -v --timeout=1800
rc=$?
[ "$rc" -eq 5 ] && echo "no tests were collected" >&2
exit "$rc"
