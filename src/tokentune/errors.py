"""One exception type for every user-facing error.

Every message is a single line that names the problem and how to fix it; the CLI prints it
without a traceback.
"""


class TokenTuneError(Exception):
    """Bad input or configuration, with a one-line explanation and the fix."""
