"""Errors of astrea that more than one layer raises."""


class BackendUnavailableError(RuntimeError):
    """An op was asked to run on an implementation that is not installed or cannot run here.

    ``short`` is a few words for tables (``python -m astrea info``); the message says it all.
    """

    def __init__(self, message: str, short: str):
        super().__init__(message)
        self.short = short
