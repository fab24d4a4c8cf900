#!/bin/sh
# bscompile deploy bundle launcher (written by `bscompile package`).
#   ./run --input NAME=FILE.npy [--input ...] --output DIR    writes DIR/<output name>.npy
#   ./run --info | --help
# Runs bin/bscompile-runner on this folder's model with this folder's lib/. Where
# BSCOMPILE_EMULATOR is set (e.g. "qemu-aarch64 -L /usr/aarch64-linux-gnu"), the runner
# is started through it, so the bundle a user ships is the bundle the tests run.
set -e
case "$0" in
  */*) here=${0%/*} ;;
  *) here=. ;;
esac
dir=$(cd "$here" && pwd -P)
LD_LIBRARY_PATH="$dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
# shellcheck disable=SC2086  # the emulator is a command line: split it on spaces
exec ${BSCOMPILE_EMULATOR:+$BSCOMPILE_EMULATOR} "$dir/bin/bscompile-runner" "$dir" "$@"
