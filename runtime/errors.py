"""The one-line form of an exception, for the one-line errors every command prints."""
from __future__ import annotations


def one_line(err: BaseException, limit: int = 300) -> str:
    """First line of ``err``'s message (its type name when empty), cut to ``limit`` characters."""
    lines = str(err).strip().splitlines()
    text = lines[0].strip() if lines else type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


class BundleError(ValueError):
    """A bundle that cannot be used (missing file, sha256 mismatch, bad manifest field); one-line message."""
