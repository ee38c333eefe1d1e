#!/bin/sh
# content-filter.sh: Postfix after-queue content filter around a confined filter program.
#
#   usage (from master.cf, pipe(8) argv): content-filter.sh -f ${sender} -- ${recipient}...
#
# This script is trusted and runs OUTSIDE the compartment, as the unprivileged pipe user: it
# runs the filter with `compartment run -p filter` (read-only system view, no network, no
# writable path, 64 MB output bound), keeps the filter's output in a private file, and
# re-injects that with `sendmail -G -i`.  The envelope is never put into a shell string: it
# stays in "$@" and goes to sendmail as separate arguments.
#
# Exit status, as Postfix pipe(8) reads it (only 71 and 75 defer):
#   0   the filtered message was handed back to Postfix
#   75  anything went wrong here, or compartment reported a failure of its own (it already
#       printed "4.x.x compartment: reason", which Postfix shows in the defer reason)
#   other: the filter's own permanent verdict, passed through (e.g. 77 bounces)
# The original stays in Postfix's queue until this script exits 0: a failing filter never
# loses the message.
set -u

EX_TEMPFAIL=75
COMPARTMENT=/usr/local/bin/compartment
FILTER=/usr/local/libexec/compartment/add-header.sh
SENDMAIL=/usr/sbin/sendmail
# pipe(8)'s time limit for this transport is 900 s (main.cf); the filter gets 300 s.
FILTER_TIMEOUT_S=300

# Owned by the pipe user, mode 0700: the filtered copy never sits in a shared /tmp.
# (pipe(8) exports no HOME, only $export_environment.)
SPOOL=/var/spool/compartment-filter

umask 077
filtered=$(mktemp "$SPOOL/filtered.XXXXXXXXXX") || {
    echo "4.3.0 content-filter: cannot create a file in $SPOOL"
    exit $EX_TEMPFAIL
}
trap 'rm -f "$filtered"' EXIT
trap 'exit $EX_TEMPFAIL' HUP INT TERM

"$COMPARTMENT" run -p filter --set limits.wall_timeout_s=$FILTER_TIMEOUT_S \
    -- "$FILTER" >"$filtered"
status=$?
if [ "$status" -ne 0 ]; then
    exit "$status"  # compartment already speaks Postfix's convention
fi
if [ ! -s "$filtered" ]; then
    echo "4.3.0 content-filter: the filter wrote an empty message"
    exit $EX_TEMPFAIL
fi

# -G: this is not an initial submission, so Postfix adds no missing headers; -i: a lone "."
# is data.  "$@" is "-f SENDER -- RECIPIENT...", exactly as pipe(8) expanded it.
"$SENDMAIL" -G -i "$@" <"$filtered" || {
    echo "4.3.0 content-filter: sendmail exited $?"
    exit $EX_TEMPFAIL
}
exit 0
