"""The error every module may raise for a problem with the user's input or environment.

cli.run reports it as one `error: ...` line naming the problem and the fix; any other exception
keeps its traceback (a bug to debug). It lives alone so that models.py, data.py and the rest can
raise it without importing the command-line helpers."""


class UserError(ValueError):
    """A problem with the user's input or environment, reported as one line by cli.run.
    A ValueError, so library callers that catch ValueError keep working."""


def first_line(error, limit=200):
    """The first line of an exception's message (its type's name when it has none), cut to `limit`
    characters: how a one-line error quotes the cause it wraps."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if limit is None else line[:limit]
