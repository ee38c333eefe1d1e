"""A header rewriter, run in DJB's prison:
`compartment pyfilter examples.python.header_rewriter:rewrite`.

The message is parsed inside the prison only; the caller gets bytes back.  It drops the
X-Spam-* headers that arrived from outside (only our own filter may set them), keeps one
Subject, and adds an X-Filtered line.  Everything the function needs is imported here, at
module level: the prison can open no file, so an import the email package would make lazily
(its generator, its header classes) must already be done when the zygote loads this module.
"""

from __future__ import annotations

import email.generator  # noqa: F401 - as_bytes() imports it lazily: done here, before the prison
import email.headerregistry  # noqa: F401 - the policy's header classes
import email.parser
import email.policy

_POLICY = email.policy.SMTP.clone(max_line_length=998)  # CRLF line ends, as sent on the wire


def rewrite(message: bytes) -> bytes:
    """The message with outside X-Spam-* headers removed and an X-Filtered header added."""
    parsed = email.parser.BytesParser(policy=_POLICY).parsebytes(message)
    for name in {key for key in parsed if key.lower().startswith("x-spam-")}:
        del parsed[name]
    subjects = parsed.get_all("Subject") or []
    if len(subjects) > 1:  # a second Subject is an attack on whoever reads the first
        del parsed["Subject"]
        parsed["Subject"] = subjects[0]
    parsed["X-Filtered"] = "compartment.isolate header_rewriter"
    return parsed.as_bytes()
