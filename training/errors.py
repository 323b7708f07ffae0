"""The one exception type the training layer raises for a user's mistake (bad data path, unknown backbone...).

Command-line entry points catch it and print its message without a traceback.
"""


class UserError(Exception):
    """A problem with the user's input, explained in one line."""
