"""The errors that mean "bad input", each turned by the CLI into one line and exit status 2.

Their messages name the key and the file, the file and line, or the reward function, and say
what was expected; none of them is a bug of ours (those surface as tracebacks).
"""


class GrpoError(ValueError):
    """Base of the input errors below."""


class ConfigError(GrpoError):
    """A bad config value; the message names the key, the source and what is expected."""


class DataError(GrpoError):
    """A bad dataset file or row; the message names the file and line."""


class RewardError(GrpoError):
    """A reward that cannot be loaded or returned something unusable; names the reward."""


class ModelError(GrpoError):
    """A model that does not exist, is not a model, or cannot be loaded; names the path."""


class RunError(GrpoError):
    """An output directory, checkpoint or resume that would lose or mix up a user's work."""
