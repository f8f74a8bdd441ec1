"""The one exception that ends an lbctl command with one line on stderr.

Its own module so that ``python -m lbctl.cli`` (where cli runs as ``__main__``) and the
command modules it loads (``lbctl.declare``) raise and catch the same class.
"""

from __future__ import annotations


class Failure(Exception):
    """Ends the command with this one line (already says what failed)."""
