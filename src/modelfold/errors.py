"""The one exception type of the public API."""

from __future__ import annotations


class FoldError(ValueError):
    """Raised for any input modelfold cannot fold, save or load.

    The message always names the module, parameter, argument or file at fault and, where one
    exists, the fix.
    """
