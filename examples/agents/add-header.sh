#!/bin/sh
# add-header.sh: a tiny filter.  Reads a message on stdin, writes it to stdout with one header
# field in front.  Meant to run inside `compartment run -p filter -- add-header.sh` (the filter
# policy shows /bin/sh and /bin/cat read-only, and gives no writable path, no network).
#
# Exit status: 0 when the whole message was copied; anything else is a failure that
# compartment turns into a temporary one (75), so the message is kept and retried.
set -eu
printf 'X-Compartment-Filtered: add-header.sh\n'
exec cat
