"""The user's mistakes, one class each, with one-line messages that name the problem and the fix.

Every face (CLI, guided mode, pipelines) catches `UserError` alone: it prints the message and exits
with `exit_code`, and only `--debug` shows a traceback. Anything else is a bug and keeps its
traceback. The kinds live here, not in the modules that raise them, so that catching them imports
nothing heavy and no module has to import another just for its exception.
"""


class UserError(Exception):
    """A mistake the user can fix; the message is one line."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A bad key, value or combination in a config file, an override or a saved config."""


class DataError(UserError, ValueError):
    """A corpus that cannot be read, fetched or used (empty, too short, wrong format)."""


class CheckpointError(UserError, ValueError):
    """A run dir or checkpoint that cannot be read, trusted or written."""


class ExportError(UserError, ValueError):
    """A model that cannot be written in, or read from, another format (Hugging Face, GGUF): a
    feature the format has no equivalent for, or a file that is not what it should be."""


class AttentionBackendError(UserError, ValueError):
    """model.attention names a backend this platform, dtype or shape cannot run."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss became NaN or infinite; the message names the last good checkpoint."""

    exit_code = 1
