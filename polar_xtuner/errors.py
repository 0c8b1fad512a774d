"""Errors that mean "fix your config", not "a bug in the code"."""


class ConfigError(ValueError):
    """A setting cannot work on this machine or with this model.

    Where the training loop builds our components (the model class), it is
    reported as one ``error: ...`` line with exit code 2 instead of a
    traceback; called directly, it is an ordinary ValueError.
    """
