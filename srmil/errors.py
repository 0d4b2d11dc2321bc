"""Errors about the user's input. The CLI prints them as one line, without a traceback."""


class InputError(ValueError):
    """Bad input (a file, a sample sheet, a config value), phrased as one line that names the
    offending file or key and the fix."""
