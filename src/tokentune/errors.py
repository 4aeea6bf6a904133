"""One exception type for every user-facing error.

Every message is a single line that names the problem and how to fix it; the CLI prints it
without a traceback.
"""
import re


class TokenTuneError(Exception):
    """Bad input or configuration, with a one-line explanation and the fix."""


def error_line(exc: BaseException) -> str:
    """The one-line message of an error, also when a DataLoader worker re-raised it.

    torch re-raises worker exceptions as ``TokenTuneError("Caught TokenTuneError in DataLoader
    worker process 0.\\nOriginal Traceback ...\\ntokentune.errors.TokenTuneError: <message>")``.
    """
    text = str(exc)
    if "\n" in text:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        text = re.sub(r"^[\w.]*TokenTuneError:\s*", "", lines[-1])
    return " ".join(text.split())
