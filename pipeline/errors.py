"""User-facing errors: raised for bad data or configuration, printed without a traceback."""
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate


class UserError(Exception):
    """Something the user can fix (a file, a line, a config key). The message says what and where."""


class DataError(UserError):
    """A data file or folder is missing or malformed."""


class ConfigError(UserError):
    """A config value is out of range or unknown."""


class StorageError(UserError):
    """A file could not be written (a full disk, a folder that cannot be written) or a store stayed busy."""


def instantiate(config, **kwargs):
    """hydra.utils.instantiate, except that a user error raised by the class (a ConfigError naming its key)
    surfaces as itself rather than wrapped in Hydra's InstantiationException."""
    try:
        return hydra_instantiate(config, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while isinstance(cause, InstantiationException):
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        raise
