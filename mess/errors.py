"""The one error type a user's mistake raises, in the library and in every CLI."""


class UserError(Exception):
    """A mistake of the user's (bad setting, missing or damaged file, a model that does not fit): the
    CLIs print it as one line on stderr and exit with code 2; library callers catch it like any other."""
