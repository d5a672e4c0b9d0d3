"""The one error the driver answers kubelet with: a Failure and its message."""


class DriverError(Exception):
    """The call failed; ``str(error)`` is the message kubelet records on the pod."""


class OptionError(DriverError):
    """An option is unknown or malformed; the message names it."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"option {name!r}: {problem}")
        self.option = name
