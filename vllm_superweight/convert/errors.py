"""The converter's error type."""

from __future__ import annotations

from ..format import FormatError


class ConversionError(FormatError):
    """A conversion that cannot proceed (bad option, bad input, unwritable destination); nothing has been written."""
