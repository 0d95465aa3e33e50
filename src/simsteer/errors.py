"""The one exception type that the CLI turns into a one-line error."""

from __future__ import annotations


class SimsError(Exception):
    """A user-facing error: bad input, a mismatched file, an unsupported model.

    The CLI prints ``sims: error: <message>`` and exits with status 2; the Python API
    raises it so callers can catch one type.
    """
