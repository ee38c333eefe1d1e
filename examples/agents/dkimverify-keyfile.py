#!/usr/bin/python3 -I
"""dkimverify with the public keys read from a file instead of DNS.

    usage: dkimverify-keyfile.py KEYFILE [--index N] < message

Debian's /usr/bin/dkimverify (python3-dkim) fetches the signer's key with a DNS TXT query;
inside a compartment there is no network, so it can only answer "signature verification
failed".  This runs the same check (dkim.DKIM(message).verify, the same package) and answers
the key query from KEYFILE, read-only in the compartment: one record per line,

    sel._domainkey.example.org  v=DKIM1; k=rsa; p=MIGfMA0G...

a name and the TXT record's text; blank lines and lines starting with # are ignored.  Useful
for the keys you know: your own domains, your relays, your partners.

Output and exit status are dkimverify's: "signature ok" and 0, or "signature verification
failed" and 1 (a signature whose key is not in KEYFILE fails too; where dkimverify dies with a
traceback on a body hash mismatch, this prints the reason on the same line).
"""

from __future__ import annotations

import argparse
import sys

import dkim


def load_keys(path: str) -> dict[bytes, bytes]:
    keys: dict[bytes, bytes] = {}
    with open(path, "rb") as lines:
        for line in lines:
            line = line.strip()
            if not line or line.startswith(b"#"):
                continue
            name, _, record = line.partition(b" ")
            keys[name.rstrip(b".").lower()] = record.strip()
    return keys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("keyfile")
    parser.add_argument("--index", metavar="N", type=int, default=0,
                        help="index of the DKIM-Signature header to verify (default 0)")
    args = parser.parse_args()
    keys = load_keys(args.keyfile)

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return keys.get(name.rstrip(b".").lower())

    message = sys.stdin.buffer.read()
    try:
        verified = dkim.DKIM(message).verify(args.index, dnsfunc=lookup)
    except dkim.DKIMException as err:  # a malformed or mismatching signature: a verdict
        print(f"signature verification failed: {err}")
        return 1
    if not verified:
        print("signature verification failed")
        return 1
    print("signature ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
