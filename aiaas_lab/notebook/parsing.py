"""Splitting a magic's line into arguments: brackets and quotes keep Python expressions whole."""

from __future__ import annotations

import argparse

from IPython.core.error import UsageError

__all__ = ["split_arguments", "Parser", "group"]

_OPENERS = {"(": ")", "[": "]", "{": "}"}


def split_arguments(text: str) -> list[str]:
    """Split on whitespace outside brackets and quotes, so `--data (X, y[:100])` stays whole."""
    tokens: list[str] = []
    current: list[str] = []
    stack: list[str] = []
    quote: str | None = None
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            current.append(ch)
            if ch == "\\" and i + 1 < len(text):
                current.append(text[i + 1])
                i += 1
            elif text.startswith(quote, i):
                current.extend(quote[1:])
                i += len(quote) - 1
                quote = None
        elif ch in "\"'":
            quote = ch * 3 if text.startswith(ch * 3, i) else ch
            current.append(quote)
            i += len(quote) - 1
        elif ch in _OPENERS:
            stack.append(_OPENERS[ch])
            current.append(ch)
        elif ch in ")]}":
            if stack and stack[-1] == ch:
                stack.pop()
            current.append(ch)
        elif ch.isspace() and not stack:
            if current:
                tokens.append("".join(current))
                current = []
        else:
            current.append(ch)
        i += 1
    if quote or stack:
        raise UsageError(f"unbalanced {'quote' if quote else 'bracket'} in: {text.strip()}")
    if current:
        tokens.append("".join(current))
    return tokens


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}. See %aiaas {self.prog.split()[-1]} --help.")


def group(tokens: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Re-join the tokens of one option's value (`--data X + 1`) and pass values as `--opt=value`,
    so an expression that starts with '-' is never mistaken for an option."""
    flags = {s for a in parser._actions if a.nargs == 0 for s in a.option_strings}
    options = {s for a in parser._actions for s in a.option_strings}
    argv: list[str] = []
    pending: str | None = None
    values: list[str] = []

    def flush() -> None:
        nonlocal pending, values
        if pending is not None:
            argv.append(f"{pending}={' '.join(values)}" if values else pending)
        pending, values = None, []

    for token in tokens:
        name = token.split("=", 1)[0]
        if token.startswith("-") and (name in options or (token.startswith("--") and name[2:3].isalpha())):
            flush()
            if "=" in token or name in flags:
                argv.append(token)
            else:
                pending = token
        elif pending is not None:
            values.append(token)
        else:
            argv.append(token)
    flush()
    return argv


