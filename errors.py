"""The error every module may raise for a problem with the user's input or environment.

cli.run reports it as one `error: ...` line naming the problem and the fix; any other exception
keeps its traceback (a bug to debug). It lives alone so that models.py, data.py and the rest can
raise it without importing the command-line helpers."""


class UserError(ValueError):
    """A problem with the user's input or environment, reported as one line by cli.run.
    A ValueError, so library callers that catch ValueError keep working."""
