#!/usr/bin/env bash
# Build the node base image without any image registry: Debian bookworm made by
# debootstrap from the same mirror apt uses on this host, then `docker import`.
#
#   bash docker/build-base-image.sh [TAG]      (default TAG: splitbed-base:bookworm)
#   FORCE=1 bash docker/build-base-image.sh    rebuild even when TAG exists
#
# The result has python3 + python3-venv (Python 3.11, like python:3.11-slim), so
# docker/Dockerfile builds on it with BASE_IMAGE=TAG. Run as root (debootstrap
# needs it). Idempotent: does nothing when TAG is already in the local store.
set -euo pipefail

tag="${1:-splitbed-base:bookworm}"
suite=bookworm

log() { printf '\033[1m[base-image]\033[0m %s\n' "$*"; }

if [ -z "${FORCE:-}" ] && docker image inspect "$tag" >/dev/null 2>&1; then
  log "$tag already present"
  exit 0
fi

# The mirror apt uses for Debian main: deb822 sources first (Debian 12 default),
# then one-line sources.list; deb.debian.org when neither names one.
mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    # First URIs line of a stanza whose Suites include the plain suite name.
    uri=$(awk -v s="$suite" '
      /^[[:space:]]*$/ { if (u != "" && ok) { print u; exit } u=""; ok=0; next }
      /^URIs:/   { u=$2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s) ok=1 }
      END        { if (u != "" && ok) print u }' "$f" | head -n1)
    if [ -n "$uri" ]; then echo "$uri"; return; fi
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk -v s="$suite" '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { if ($(i+1) == s) { print $i; exit } break } }' "$f")
    if [ -n "$uri" ]; then echo "$uri"; return; fi
  done
  echo "http://deb.debian.org/debian"
}

url="${DEBIAN_MIRROR:-$(mirror)}"
root="$(mktemp -d /tmp/splitbed-base.XXXXXX)"
# debootstrap leaves bind mounts (proc, sys) behind when it fails half-way;
# unmount them before removing the tree so rm never walks into the host's /proc.
cleanup() {
  for m in proc sys dev/pts dev; do umount -l "$root/$m" 2>/dev/null || true; done
  rm -rf --one-file-system "$root"
}
trap cleanup EXIT

log "debootstrap $suite from $url"
# minbase: no init system, no docs; libstdc++6 comes with it (LiteRT needs it).
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$suite" "$root" "$url" >"$root.log" 2>&1 || { tail -n 30 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"

# Shrink: package caches, lists, docs and man pages are not needed at run time.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
       "$root"/var/log/*.log "$root"/tmp/*
printf 'deb %s %s main\n' "$url" "$suite" >"$root/etc/apt/sources.list"

log "docker import -> $tag"
tar --numeric-owner --one-file-system -C "$root" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' \
  --message "debootstrap $suite minbase + python3 from $url" \
  - "$tag" >/dev/null
log "done: $(docker image inspect -f '{{.Id}} {{.Size}}' "$tag")"
