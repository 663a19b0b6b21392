"""User-facing errors: raised for bad data or configuration, printed without a traceback."""


class UserError(Exception):
    """Something the user can fix (a file, a line, a config key). The message says what and where."""


class DataError(UserError):
    """A data file or folder is missing or malformed."""


class ConfigError(UserError):
    """A config value is out of range or unknown."""
