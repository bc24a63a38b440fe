"""The package's error types, and the one way an exception is written as a one-line reason.

This module imports nothing of the package: every other module (and `jobs`) may use it.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """The checkpoint cannot be used with the requested preset."""


def describe_error(e: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line, for error rows, logs and one-line error messages.

    The message's first non-empty line is kept, and the next one too when the first ends with
    a colon (it announces what follows, as torch's "Error(s) in loading state_dict for X:"
    does). An exception that wraps another in a `cause` attribute (Ray's task errors, whose
    text is the remote traceback) is described by what it wraps.
    """
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        return describe_error(cause, limit)
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    described = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return described[:limit]
