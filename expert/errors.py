"""User-facing errors.

Everything a user can cause (a bad file, a bad config value, a missing model) raises an
`ExpertError` subclass whose message says what is wrong and how to fix it. The command
line prints these as one paragraph, never as a traceback.
"""


class ExpertError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""


class ConfigError(ExpertError):
    """A configuration value is missing, unknown or invalid."""


class DataError(ExpertError):
    """A data file is unreadable or a record in it is malformed."""


class ModelError(ExpertError):
    """A model source cannot be found, read or imported."""


def did_you_mean(word: str, choices) -> str:
    """" (did you mean 'x'?)" for the closest of `choices`, or "" when none is close."""
    import difflib

    hint = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""
