"""Errors about the user's input. The CLI prints them as one line, without a traceback."""

from __future__ import annotations

import re


class InputError(ValueError):
    """Bad input (a file, a sample sheet, a config value), phrased as one line that names the
    offending file or key and the fix."""


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
