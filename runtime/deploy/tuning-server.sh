#!/bin/sh
# bscompile tuning server launcher (written by `bscompile package --tuning-server`).
#   ./tuning-server                  one TVM RPC session on stdin/stdout: what
#                                    `bscompile tune --remote ssh://user@board` starts
#   ./tuning-server --port 9090      TCP sessions on 127.0.0.1:9090 (reach it with ssh -L)
#   ./tuning-server --tracker HOST:PORT --key rpi4 --host 0.0.0.0   join a fleet
#   ./tuning-server --info | --help
# A session runs the code its client uploads: keep TCP on 127.0.0.1 unless everyone who
# can reach the port may run code on this board. Runs bin/bscompile-rpc-server with this
# folder's lib/; where BSCOMPILE_EMULATOR is set (e.g. "qemu-aarch64 -L /usr/aarch64-linux-gnu")
# the server is started through it.
set -e
case "$0" in
  */*) here=${0%/*} ;;
  *) here=. ;;
esac
dir=$(cd "$here" && pwd -P)
LD_LIBRARY_PATH="$dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
# shellcheck disable=SC2086  # the emulator is a command line: split it on spaces
exec ${BSCOMPILE_EMULATOR:+$BSCOMPILE_EMULATOR} "$dir/bin/bscompile-rpc-server" "$@"
