#!/bin/sh
# Roll a release out to several hosts, one host at a time, and stop at the first host
# whose deploy fails: the hosts after it are not touched, and every host keeps serving
# (a failed `sockherd restart` leaves the old generation in place). See docs/multihost.md.
#
# usage: rolling-deploy.sh [-x COMMAND] HOST...
#
# COMMAND deploys one host and exits non-zero if that failed; it runs as
# `sh -c COMMAND rolling-deploy HOST`, so the host is "$1" in it. The default runs the
# host's own deploy script (a pull, an install, then `sockherd restart`) over ssh:
#
#   ssh -o BatchMode=yes "$1" sudo -u myapp /srv/myapp/deploy.sh
#
# Exit status: 0 when every host is deployed, else the failing host's command's status
# (1 from `sockherd restart`, 255 from ssh itself), or 2 for bad usage.
set -u

command='ssh -o BatchMode=yes "$1" sudo -u myapp /srv/myapp/deploy.sh'
if [ "${1-}" = "-x" ]; then
    [ $# -ge 2 ] || { echo "rolling-deploy: -x needs a COMMAND" >&2; exit 2; }
    command=$2
    shift 2
fi
if [ $# -eq 0 ]; then
    echo "usage: rolling-deploy.sh [-x COMMAND] HOST..." >&2
    exit 2
fi

total=$#
n=0
for host in "$@"; do
    n=$((n + 1))
    echo "rolling-deploy: [$n/$total] $host" >&2
    sh -c "$command" rolling-deploy "$host"
    status=$?
    if [ "$status" -ne 0 ]; then
        shift "$n"
        echo "rolling-deploy: $host failed (exit $status); it keeps its previous release." >&2
        [ $# -eq 0 ] || echo "rolling-deploy: not deployed: $*" >&2
        exit "$status"
    fi
done
echo "rolling-deploy: all $total host(s) deployed" >&2
