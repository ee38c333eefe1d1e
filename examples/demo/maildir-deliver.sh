#!/bin/sh
# Deliver stdin into the Maildir named by $1: write under tmp/, then rename into new/, the
# Maildir protocol's way of never showing a half-written message.  Exit 75 (temporary) on any
# failure, so the MTA keeps the message.
set -e
maildir=$1
name="$(date +%s).$$.compartment"
cat > "$maildir/tmp/$name" || exit 75
mv "$maildir/tmp/$name" "$maildir/new/$name" || exit 75
