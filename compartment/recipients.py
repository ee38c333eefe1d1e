"""Which recipients the LMTP front delivers, and where: the administrator's lookup.

Unprivileged (the LMTP front's user).  Two kinds, named with `--recipients`:

    passwd[:TEMPLATE]   the local part is a user of the system's passwd with a uid of at least
                        --min-uid; the mailbox is TEMPLATE with {home} and {user} replaced
                        (default {home}/Maildir).  Any domain: the MTA decided it is ours.
    map:PATH            a file of `ADDRESS MAILBOX` lines ('#' comments); ADDRESS is a whole
                        address, or a local part alone for every domain.  Compared without
                        regard to case.  Read at start and on SIGHUP.

With --recipient-delimiter (Postfix's recipient_delimiter, e.g. +), alice+lists@ is looked up as
alice@ (an exact entry in a map wins), and "lists" is the recipient's extension.

A mailbox is an absolute path of plain characters: it is handed to the supervisor as a --set
value, where a comma would split it into a list.
"""

from __future__ import annotations

import os
import pwd
import re
from dataclasses import dataclass, replace

from compartment.fronts import FrontError

MAP_BYTES = 16 << 20
_MAILBOX_RE = re.compile(r"/[A-Za-z0-9._+@/-]*")


@dataclass(frozen=True)
class Recipient:
    address: str   # as the client sent it (with its extension)
    local: str
    domain: str
    mailbox: str
    user: str = ""       # the passwd user, for a passwd lookup
    extension: str = ""  # after the recipient delimiter


class Lookup:
    def __init__(self, spec: str, min_uid: int = 1000, delimiter: str = "") -> None:
        kind, _, argument = spec.partition(":")
        if kind not in ("passwd", "map") or (kind == "map" and not argument.startswith("/")):
            raise FrontError(f"--recipients {spec}: expected passwd, passwd:TEMPLATE (with "
                             "{home} or {user}) or map:/PATH")
        self.kind, self.min_uid, self.delimiter = kind, min_uid, delimiter
        self.template = argument or "{home}/Maildir"
        self.path = argument if kind == "map" else ""
        self.entries: dict[str, str] = {}
        if kind == "passwd" and not self.template.startswith(("/", "{home}")):
            raise FrontError(f"--recipients {spec}: the mailbox must be an absolute path")
        self.reload()

    def reload(self) -> None:
        if self.kind == "map":
            self.entries = read_map(self.path)

    def find(self, address: str) -> Recipient | None:
        """The recipient, or None when nobody of ours has that address."""
        local, at, domain = address.rpartition("@")
        if not at:
            local, domain = address, ""
        if not local:
            return None
        found = self._find(address, local, domain, "")
        if found is None and self.delimiter and self.delimiter in local[1:]:
            base, _, extension = local.partition(self.delimiter)
            found = self._find(f"{base}@{domain}" if at else base, local, domain, extension)
        return None if found is None else replace(found, address=address)

    def _find(self, key: str, local: str, domain: str, extension: str) -> Recipient | None:
        """`key` is the address looked up (its extension gone), `local` the whole local part."""
        name = key.rpartition("@")[0] or key
        if self.kind == "map":
            mailbox = self.entries.get(key.lower()) or self.entries.get(name.lower())
            return Recipient(key, local, domain, mailbox, "", extension) if mailbox else None
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return None
        if entry.pw_uid < self.min_uid:
            return None
        mailbox = self.template.replace("{home}", entry.pw_dir).replace("{user}", entry.pw_name)
        mailbox = os.path.normpath(mailbox)
        if not _MAILBOX_RE.fullmatch(mailbox):
            return None  # a home of odd characters: not ours to guess at
        return Recipient(key, local, domain, mailbox, entry.pw_name, extension)


def read_map(path: str) -> dict[str, str]:
    try:
        with open(path, "rb") as file:
            data = file.read(MAP_BYTES + 1)
    except OSError as err:
        raise FrontError(f"{path}: {err.strerror}") from None
    if len(data) > MAP_BYTES:
        raise FrontError(f"{path}: larger than {MAP_BYTES} bytes")
    entries = {}
    for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise FrontError(f"{path}:{number}: expected ADDRESS MAILBOX, got {raw.strip()!r}")
        address, mailbox = fields
        mailbox = os.path.normpath(mailbox)
        if not _MAILBOX_RE.fullmatch(mailbox) or mailbox == "/":
            raise FrontError(f"{path}:{number}: {fields[1]!r}: expected an absolute path of "
                             "letters, digits and . _ + @ / -")
        entries[address.lower()] = mailbox
    return entries
