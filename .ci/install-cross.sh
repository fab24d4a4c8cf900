#!/usr/bin/env bash
# Cross toolchain + user-mode emulator for the aarch64 deploy bundle (tests/test_aarch64.py):
# Debian's g++-aarch64-linux-gnu (compiler, binutils: objdump/strip, aarch64 glibc) and
# qemu-user (qemu-aarch64). Idempotent and quiet: does nothing when both are present.
set -euo pipefail
need=()
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || need+=(g++-aarch64-linux-gnu)
command -v aarch64-linux-gnu-objdump >/dev/null 2>&1 || need+=(binutils-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)
[ ${#need[@]} -eq 0 ] && exit 0
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo=(sudo -n); else
    echo "install-cross.sh: need root (or sudo) to apt-get install ${need[*]}" >&2; exit 1
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-cross.sh: no apt-get; install ${need[*]} (Debian/Ubuntu names) yourself" >&2; exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "install-cross.sh: installing ${need[*]}" >&2
${sudo[@]+"${sudo[@]}"} apt-get update -qq >/dev/null
${sudo[@]+"${sudo[@]}"} apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
