"""A MIME attachment stripper, run in DJB's prison:
`compartment pyfilter examples.python.attachment_stripper:strip`.

Every attachment (a part with Content-Disposition: attachment, or a part that is neither text
nor a container) is replaced by a short text/plain note naming what was removed.  The MIME
parsing, where the hostile input is, happens only inside the prison; the caller gets bytes.
The email package imports some of its modules lazily, which the prison cannot do (it opens no
file): they are imported here, at module level, so the zygote has them before any call.
"""

from __future__ import annotations

import email.contentmanager  # noqa: F401 - set_content() uses it
import email.generator  # noqa: F401 - as_bytes() imports it lazily
import email.headerregistry  # noqa: F401 - the policy's header classes
import email.message
import email.parser
import email.policy

_POLICY = email.policy.SMTP.clone(max_line_length=998)


def strip(message: bytes) -> bytes:
    """The message with each attachment replaced by a note."""
    parsed = email.parser.BytesParser(policy=_POLICY).parsebytes(message)
    removed = 0
    for part in parsed.walk():
        if part.is_multipart() or not _is_attachment(part):
            continue
        name = part.get_filename() or "unnamed"
        size = len(part.get_payload(decode=True) or b"")
        note = f"[attachment {name!r} ({part.get_content_type()}, {size} bytes) removed]\n"
        part.set_content(note)  # clears its Content-* headers: text/plain, utf-8
        removed += 1
    if removed:
        parsed["X-Attachments-Removed"] = str(removed)
    return parsed.as_bytes()


def _is_attachment(part: email.message.Message) -> bool:
    if part.get_content_disposition() == "attachment":
        return True
    return part.get_content_maintype() not in ("text", "multipart", "message")
