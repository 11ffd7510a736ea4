"""User errors: printed as one line each by the entry point, exit code 2, no traceback."""

from __future__ import annotations

from hydra.errors import CompactHydraException

EXIT_USER_ERROR = 2


class UserError(CompactHydraException):
    """A problem the user can fix (config, path, data, environment); the message says how."""


class ConfigError(UserError):
    """Every problem found in one composed config."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class DataError(UserError):
    """A dataset that cannot be read: names the file and line."""


class TrainingDiverged(UserError):
    """Non-finite loss or gradients for too many steps in a row: the run stops, its checkpoints stay finite."""


class Interrupted(Exception):
    """SIGINT/SIGTERM before the training loop took the signals over: the start-up stops, nothing was trained."""

    def __init__(self, signum: int):
        import signal

        self.signum, self.name = signum, signal.Signals(signum).name
        super().__init__(f"stopped by {self.name} during start-up, before the first step; nothing of this start was "
                         "trained or saved")
