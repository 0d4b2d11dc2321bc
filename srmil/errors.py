"""Errors about the user's input. The CLI prints them as one line, without a traceback."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, TypeVar

T = TypeVar("T")


class InputError(ValueError):
    """Bad input (a file, a sample sheet, a config value), phrased as one line that names the
    offending file or key and the fix."""


def settings_from_dict(cls: type[T], values: dict[str, Any], source: str, what: str,
                       error: type[InputError] = InputError) -> T:
    """`cls(**values)` for a settings dataclass, refusing unknown keys (typos) with a one-line
    `error` that names them and the allowed ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise error(f"{source}: unknown {what} setting(s) {', '.join(unknown)}; "
                    f"use one of {', '.join(sorted(names))}")
    return cls(**values)


def one_line(err: BaseException) -> str:
    """The message of `err` on one line.

    An error raised in a DataLoader worker comes back wrapped ("Caught SlideError in DataLoader
    worker process 0. Original Traceback ..."): its last line holds the original message.
    """
    text = str(err).strip()
    if "\n" in text and text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = re.sub(r"^[\w.]+(Error|Exception): ", "", last)
    return " ".join(text.split()) or type(err).__name__
