"""Exceptions with the process exit code each one maps to (see README, "Exit codes")."""

EXIT_OK = 0  # everything done (or skipped)
EXIT_FAILED = 1  # at least one input failed; the rest were still processed
EXIT_USAGE = 2  # bad command line (Click's own code)
EXIT_MODELS = 3  # a model file is missing or does not verify
EXIT_SOURCE_LOST = 4  # deid live: the camera or network source stopped or disconnected (output finalized)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT); no partial output left behind, report written
EXIT_TERMINATED = 143  # SIGTERM (kill, timeout, cron, a scheduler); the same otherwise


class DeidError(Exception):
    """Base class: a failure explained in one line to the user."""

    exit_code = EXIT_FAILED


class InputError(DeidError):
    """An input file cannot be read, decoded, or is not supported."""


class OutputError(DeidError):
    """The output cannot be written as asked (container cannot hold a stream, ...)."""


class SourceLost(InputError):
    """deid live: a camera or network source stopped sending or disconnected (after the
    ``--reconnect`` attempts, if any). The output written so far is finalized."""

    exit_code = EXIT_SOURCE_LOST


class ModelError(DeidError):
    """A model file is missing, corrupt, or of the wrong kind."""

    exit_code = EXIT_MODELS


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal: raised by the CLI's SIGINT/SIGTERM handler, and re-raised by
    ``anonymize()`` with the report of the run so far (the file in progress has status
    "interrupted", its partial output removed; the files not started have status "pending")."""

    def __init__(self, signum: int = 2, report: "dict | None" = None):
        super().__init__(f"signal {signum}")
        self.signum = signum
        self.report = report

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
