#!/usr/bin/env bash
# Refuse to start a venv install that cannot fit on its disk.
#
# Usage: scripts/need_space.sh VENV_DIR GIB WHAT
#
# pip on a full disk stops midway with "[Errno 28] No space left on device",
# after minutes of downloads, leaving a half-built venv. This checks first and
# says how much is missing and where. What an earlier, unfinished install of the
# same venv already holds counts towards GIB, since pip keeps it.
# Exit 0: it fits; 2: it does not, or the arguments are wrong.
set -euo pipefail

if [[ $# -ne 3 || ! $2 =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
    echo "usage: scripts/need_space.sh VENV_DIR GIB WHAT" >&2
    exit 2
fi
venv=$1 need_gib=$2 what=$3

# df needs a path that exists: the venv or its nearest existing parent.
probe=$venv
while [[ ! -e $probe ]]; do probe=$(dirname "$probe"); done

read -r free_kib mount < <(df -Pk "$probe" | awk 'NR == 2 {print $4, $6}')
if [[ -z ${free_kib:-} ]]; then echo "error: df could not read the free space under $probe" >&2; exit 2; fi
have_kib=0
if [[ -d $venv ]]; then have_kib=$(du -sk "$venv" | cut -f1); fi

awk -v need="$need_gib" -v free="$free_kib" -v have="$have_kib" \
    -v venv="$venv" -v what="$what" -v mount="$mount" '
BEGIN {
    gib = 1024 * 1024
    missing = need * gib - have - free
    if (missing <= 0) exit 0
    printf "error: not enough disk space to build %s %s: it needs about %.1f GiB, " \
           "%.1f GiB is free on %s%s; free %.1f GiB more and run make again\n",
           what, venv, need, free / gib, mount,
           (have > 0 ? sprintf(" and %.1f GiB is already installed", have / gib) : ""),
           missing / gib > "/dev/stderr"
    exit 2
}'
