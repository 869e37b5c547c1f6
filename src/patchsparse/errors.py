"""One exception type for every user-facing failure.

The CLI prints its message as a single line and exits non-zero; library users catch it.
"""


class PatchsparseError(Exception):
    """A problem with the user's input or environment, explained in one line."""
