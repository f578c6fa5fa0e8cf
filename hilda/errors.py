"""The project's input errors. Each names the file, frame or store at fault; the CLIs print
them as one line (exit code 2) instead of a traceback. Anything else is a bug and keeps its
traceback."""


class HildaError(ValueError):
    """Base class of errors caused by the user's input (data, store, configuration)."""


class ConfigError(HildaError):
    """An option or configuration value is invalid."""


class FrameError(HildaError):
    """A frame could not be processed; the message names the frame and the file."""
