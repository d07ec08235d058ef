"""Exceptions with the process exit code each one maps to (see README, "Exit codes")."""

EXIT_OK = 0  # everything done (or skipped)
EXIT_FAILED = 1  # at least one input failed; the rest were still processed
EXIT_USAGE = 2  # bad command line (Click's own code)
EXIT_MODELS = 3  # a model file is missing or does not verify
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM; no partial output left behind


class DeidError(Exception):
    """Base class: a failure explained in one line to the user."""

    exit_code = EXIT_FAILED


class InputError(DeidError):
    """An input file cannot be read, decoded, or is not supported."""


class OutputError(DeidError):
    """The output cannot be written as asked (container cannot hold a stream, ...)."""


class ModelError(DeidError):
    """A model file is missing, corrupt, or of the wrong kind."""

    exit_code = EXIT_MODELS
