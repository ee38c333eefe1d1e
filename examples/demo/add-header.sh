#!/bin/sh
# A filter in the oldest style: a shell script that prepends a header and copies the rest.
# It runs under the `filter` policy: read-only system, no network, no writes but stdout.
printf 'X-Filtered-By: compartment demo (%s)\n' "$(id -u)"
exec cat
