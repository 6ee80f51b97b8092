"""Wording helpers shared by messages."""

from __future__ import annotations


def count_noun(count: int, singular: str, plural: str | None = None) -> str:
    """Return ``count`` with the noun in the matching number: ``1 module``, ``2 modules``.

    Args:
        count: how many.
        singular: the noun phrase for one, such as ``"module"`` or ``"more tensor"``.
        plural: the noun phrase for other counts; default ``singular + "s"``.
    """
    if count == 1:
        return f"{count} {singular}"
    return f"{count} {plural or singular + 's'}"
