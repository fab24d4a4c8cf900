#!/bin/sh
# bscompile deploy bundle launcher (written by `bscompile package`), installed as:
#   ./run --input NAME=FILE.npy [--input ...] --output DIR    writes DIR/<output name>.npy
#   ./run --info | --help
#   ./tuning-server [--stdio | --port P | --tracker HOST:PORT --key NAME] | --info | --help
#                   (bundles made with --tuning-server: the device side of `bscompile tune --remote`;
#                   a session runs the code its client uploads, so TCP stays on 127.0.0.1 unless
#                   everyone who can reach the port may run code on this board)
# Runs bin/bscompile-runner on this folder's model (or bin/bscompile-rpc-server) with this
# folder's lib/. Where BSCOMPILE_EMULATOR is set (e.g. "qemu-aarch64 -L /usr/aarch64-linux-gnu"),
# the program is started through it, so the bundle a user ships is the bundle the tests run.
set -e
case "$0" in
  */*) here=${0%/*} ;;
  *) here=. ;;
esac
dir=$(cd "$here" && pwd -P)
LD_LIBRARY_PATH="$dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
case "${0##*/}" in
  tuning-server) set -- "$dir/bin/bscompile-rpc-server" "$@" ;;
  *) set -- "$dir/bin/bscompile-runner" "$dir" "$@" ;;
esac
# shellcheck disable=SC2086  # the emulator is a command line: split it on spaces
exec ${BSCOMPILE_EMULATOR:+$BSCOMPILE_EMULATOR} "$@"
