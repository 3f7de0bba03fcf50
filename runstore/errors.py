"""Errors the user can fix: the CLI prints them in one line and exits with code 2."""


class InputError(Exception):
    """Bad input (config, dataset, checkpoint, argument), named with what was expected."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Ray ships a worker's exception to the driver; keep both fields across the trip.
        return (InputError, (self.where, self.problem))


class LeaseLost(InputError):
    """This driver, or a worker it started, no longer holds the run: another driver took
    its lease over (a newer epoch), or the lease expired before it could be renewed. Its
    writes are refused so that two drivers never train the same run."""

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (LeaseLost, (self.where, self.problem))


class OperationalError(RuntimeError):
    """The machinery failed, not the input: Ray could not start or stay up, islands are
    gone, storage stayed unreachable. The CLI prints one line and exits with code 1;
    checkpoints stay, so `islands resume` continues once it is back."""
