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


class Interrupted(CompactHydraException):
    """SIGINT/SIGTERM while the training loop's own handlers are not installed (start-up, the final save, between
    sweep trials): the process stops with one line (Hydra prints only the message of this class)."""

    def __init__(self, signum: int | str):
        import signal

        if isinstance(signum, str):  # a signal inside an OmegaConf accessor: it re-raises type(error)(its message)
            signum = next((s for s in signal.Signals if f"stopped by {s.name} " in signum), signal.SIGTERM)
        self.signum, self.name = int(signum), signal.Signals(signum).name
        super().__init__(f"stopped by {self.name} before the run started; nothing was trained or saved")
