"""Errors about the user's input. The CLI prints them as one line, without a traceback."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


class InputError(ValueError):
    """Bad input (a file, a sample sheet, a config value), phrased as one line that names the
    offending file or key and the fix."""


def settings_from_dict(cls: type[T], values: dict[str, Any], source: str, what: str,
                       error: type[InputError] = InputError) -> T:
    """`cls(**values)` for a settings dataclass, refusing unknown keys (typos) and values
    outside their range with a one-line `error` that names `source`, the setting and the fix."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise error(f"{source}: unknown {what} setting(s) {', '.join(unknown)}; "
                    f"use one of {', '.join(sorted(names))}")
    try:
        return cls(**values)
    except SettingValueError as err:  # out of range (checked by the dataclass itself)
        raise error(f"{source}: {err.name} {err.value!r} must be {err.allowed}; fix it there") \
            from None


@dataclass(frozen=True)
class Allowed:
    """The values a setting may take: `kind` (bool, int or float), within `low`-`high`
    (`low` itself excluded with `low_open`), or one of `words`, or None when `none_ok`."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    words: tuple[str, ...] = ()
    none_ok: bool = False

    def __str__(self) -> str:
        if self.kind is bool:
            return "true or false"
        number = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            number += f" {self.low:g}-{self.high:g}"
        elif self.low is not None:
            number += f" {'>' if self.low_open else '>='} {self.low:g}"
        extra = [f'"{w}"' for w in self.words] + (["null"] if self.none_ok else [])
        return " or ".join([*extra, number])

    def fits(self, value: Any) -> bool:
        if value is None:
            return self.none_ok
        if isinstance(value, str):
            return value in self.words
        if self.kind is bool or isinstance(value, bool):
            return self.kind is bool and isinstance(value, bool)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False  # nan and inf compare false with everything: refuse them here
        if self.kind is int and not float(value).is_integer():
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value <= self.high


class SettingValueError(InputError):
    """A setting outside its allowed values. The message names the setting, the value and
    what is allowed; readers of a config or a sheet add where the value came from."""

    def __init__(self, section: str, name: str, value: Any, allowed: Allowed | str) -> None:
        self.name, self.value, self.allowed = name, value, str(allowed)
        super().__init__(f"{section}.{name} {value!r} must be {allowed}")


def check_settings(settings: Any, allowed: dict[str, Allowed], section: str,
                   error: type[SettingValueError]) -> None:
    """Raise `error` for the first field of a settings dataclass outside its allowed values;
    whole numbers given as floats (8192.0) become ints."""
    for name, limits in allowed.items():
        value = getattr(settings, name)
        if not limits.fits(value):
            raise error(section, name, value, limits)
        if limits.kind is int and isinstance(value, float):
            object.__setattr__(settings, name, int(value))


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
