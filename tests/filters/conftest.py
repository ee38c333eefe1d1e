"""Fixtures of the real-filter tests: the Debian packages, a MIME corpus, DKIM keys, a tiny
ClamAV database — all made here, at test time, from nothing downloaded but the packages."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

import pytest

# tests/ is on sys.path (tests/conftest.py puts it there): the MTA fixtures' apt helpers.
from integration.debian import APT_ENV, APT_OPTIONS, installed

# Debian package of each tool under test (formail: procmail; reformail: maildrop; sigtool and
# clamscan: clamav; openssl makes the DKIM key).
PACKAGES = ["spamassassin", "procmail", "maildrop", "ripmime", "altermime", "mblaze",
            "python3-dkim", "clamav", "openssl"]
SYSTEM_PYTHON = "/usr/bin/python3"
OWNER_UID = 64321  # owns the scratch directories: outside the uid pool, not root
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
DKIM_SELECTOR, DKIM_DOMAIN = "compartment", "example.org"


@pytest.fixture(scope="session")
def filter_packages() -> None:
    """Install the filters' Debian packages once; skip with the reason when that is impossible."""
    if os.geteuid() != 0:
        pytest.skip("the real-filter tests install Debian packages and run compartments as "
                    "root, as CI does")
    if not shutil.which("apt-get") or not shutil.which("dpkg-query"):
        pytest.skip("the real-filter tests need a Debian system (apt-get, dpkg-query)")
    missing = [p for p in PACKAGES if not installed(p)]
    if not missing:
        return
    command = ["apt-get", "install", *APT_OPTIONS, *missing]
    done = subprocess.run(command, env=APT_ENV, capture_output=True, text=True, timeout=900,
                          check=False)
    if done.returncode != 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=APT_ENV, capture_output=True,
                       timeout=900, check=False)
        done = subprocess.run(command, env=APT_ENV, capture_output=True, text=True,
                              timeout=900, check=False)
    still = [p for p in PACKAGES if not installed(p)]
    if still:
        pytest.skip(f"cannot install {' '.join(still)} with apt-get (no mirror reachable?): "
                    f"{done.stderr.strip()[-300:]}")


def _headers(message: EmailMessage, subject: str, marker: str) -> EmailMessage:
    message["From"] = "Alice Example <alice@example.org>"
    message["To"] = "Bob Example <bob@example.net>"
    message["Subject"] = subject
    message["Date"] = format_datetime(datetime(2026, 11, 27, 12, 0, tzinfo=UTC))
    message["Message-ID"] = f"<{marker}@example.org>"
    return message


@dataclass(frozen=True)
class Corpus:
    plain: bytes
    multipart: bytes  # text + binary attachment (ATTACHMENT) + a text file attachment
    alternative: bytes  # multipart/alternative, text and HTML
    spam: bytes  # GTUBE
    attachment: bytes  # the binary attachment's bytes
    attachment_name: str
    notes: bytes  # the text attachment's bytes
    marker: str  # a random string in the plain message's body (the ClamAV body signature)


@pytest.fixture(scope="session")
def corpus() -> Corpus:
    marker = "compartment-test-marker-" + os.urandom(12).hex()
    plain = _headers(EmailMessage(), "plain text", "plain")
    plain.set_content(f"Hello Bob,\n\na plain message, with a marker: {marker}\n\nAlice\n")

    attachment = os.urandom(3000) + bytes(range(256)) * 20  # every byte value, not text
    notes = b"line one\r\nline two, with CRLF\r\n\xe9t\xe9 (latin-1)\n"
    mixed = _headers(EmailMessage(), "two attachments", "multipart")
    mixed.set_content("The report and its notes are attached.\n")
    mixed.add_attachment(attachment, maintype="application", subtype="octet-stream",
                         filename="report.bin")
    mixed.add_attachment(notes, maintype="application", subtype="octet-stream",
                         filename="notes.txt")

    alternative = _headers(EmailMessage(), "alternative", "alternative")
    alternative.set_content("Plain version of the text.\n")
    alternative.add_alternative("<html><body><p>HTML version of the text.</p></body></html>\n",
                                subtype="html")

    spam = _headers(EmailMessage(), "Buy now", "spam")
    spam.set_content(f"{GTUBE}\n")
    return Corpus(plain.as_bytes(), mixed.as_bytes(), alternative.as_bytes(), spam.as_bytes(),
                  attachment, "report.bin", notes, marker)


@pytest.fixture(scope="session")
def stdlib_messages() -> list[Path]:
    """The Python standard library's email test messages, when this machine has them
    (Debian ships them in libpython3.X-testsuite, which these tests do not install)."""
    import email

    roots = {Path(email.__file__).resolve().parent.parent / "test" / "test_email" / "data",
             Path(f"/usr/lib/python3.{sys.version_info.minor}/test/test_email/data")}
    return sorted(p for root in roots if root.is_dir() for p in root.glob("msg_*.txt"))


@dataclass(frozen=True)
class Dkim:
    signed: bytes
    keyfile: Path  # "selector._domainkey.domain TXT" lines, as dkimverify-keyfile.py reads


@pytest.fixture(scope="session")
def dkim_material(filter_packages: None, corpus: Corpus, tmp_path_factory) -> Dkim:
    """An RSA key made here, the plain message signed with it by python3-dkim (dkimpy)."""
    directory = tmp_path_factory.mktemp("dkim")
    directory.chmod(0o755)
    private = directory / "private.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(private), "2048"], check=True,
                   capture_output=True)
    public = subprocess.run(["openssl", "rsa", "-in", str(private), "-pubout", "-outform",
                             "DER"], check=True, capture_output=True).stdout
    keyfile = directory / "keys"
    keyfile.write_text(f"# made by the test\n{DKIM_SELECTOR}._domainkey.{DKIM_DOMAIN} "
                       f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}\n")
    keyfile.chmod(0o644)
    sign = ("import dkim, sys; m = sys.stdin.buffer.read(); sys.stdout.buffer.write(dkim.sign("
            "m, sys.argv[1].encode(), sys.argv[2].encode(), open(sys.argv[3], 'rb').read(), "
            "include_headers=[b'from', b'to', b'subject', b'date', b'message-id']) + m)")
    signed = subprocess.run([SYSTEM_PYTHON, "-c", sign, DKIM_SELECTOR, DKIM_DOMAIN,
                             str(private)], input=corpus.plain, check=True,
                            capture_output=True).stdout
    return Dkim(signed, keyfile)


@pytest.fixture(scope="session")
def clamav_db(filter_packages: None, corpus: Corpus, tmp_path_factory) -> Path:
    """A two-signature ClamAV database: the MD5 of the binary attachment (made by sigtool;
    found only if clamscan decodes the MIME part) and the plain message's random marker."""
    directory = tmp_path_factory.mktemp("clamav")
    sample = directory / "sample"
    sample.write_bytes(corpus.attachment)
    md5 = subprocess.run(["sigtool", "--md5", str(sample)], check=True, capture_output=True,
                         text=True).stdout.split(":")
    sample.unlink()
    (directory / "compartment.hdb").write_text(
        f"{md5[0]}:{md5[1]}:Compartment.Test.Attachment\n")
    (directory / "compartment.ndb").write_text(
        f"Compartment.Test.Marker:0:*:{corpus.marker.encode().hex()}\n")
    for path in (directory, *directory.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return directory
