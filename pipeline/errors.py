"""The project's expected errors: one base class, so the CLI prints one line for any of them.

Each subclass is a kind of bad input or missing prerequisite; its message names the file,
line, key or value and says what was expected. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class DeprojectorError(Exception):
    """An expected failure with a message for the user (no traceback)."""
