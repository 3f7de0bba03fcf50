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
