"""User-facing errors: one paragraph naming the argument, what was expected and what was found."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["AiaasError", "BadArgument"]


class AiaasError(Exception):
    """An error the user can act on; the magics print it without a traceback."""


class BadArgument(AiaasError, ValueError):
    """An argument had the wrong form or value."""

    def __init__(self, argument: str, expected: str, found: str, hint: str = "") -> None:
        self.argument = argument
        message = f"{argument}: expected {expected}, but found {found}."
        if hint:
            message += f" {hint}"
        super().__init__(message)


def close_matches(name: str, candidates: Iterable[str]) -> str:
    """A 'Did you mean ...?' sentence, or an empty string when nothing is close."""
    matches = difflib.get_close_matches(name, sorted(set(candidates)), n=3, cutoff=0.6)
    if not matches:
        return ""
    return "Did you mean " + " or ".join(f"'{m}'" for m in matches) + "?"


def describe(value: object) -> str:
    """A short description of a value for error messages: its type and, for arrays, its shape."""
    shape = getattr(value, "shape", None)
    kind = type(value).__module__.split(".")[0] + "." + type(value).__qualname__
    kind = kind.removeprefix("builtins.")
    if shape is not None:
        return f"{kind} of shape {tuple(shape)}"
    if isinstance(value, (list, tuple)):
        return f"{kind} of length {len(value)}"
    return kind
