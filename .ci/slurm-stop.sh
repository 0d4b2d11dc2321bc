#!/usr/bin/env bash
# Stop the daemons .ci/slurm-start.sh started, by their pid files, newest first; nothing else.
set -uo pipefail

dir=${SRMIL_SLURM_DIR:-/tmp/srmil-slurm}
[ -s "$dir/pidfiles" ] || exit 0

status=0
for pidfile in $(tac "$dir/pidfiles"); do
    [ -s "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "slurm-stop: $pidfile ($pid) ignored SIGTERM for 10 s; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || status=1
    fi
done
: >"$dir/pidfiles"
exit $status
