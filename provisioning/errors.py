"""One error type for everything a technician can hit: one line saying what happened and what to do."""

from __future__ import annotations


class ProvisioningError(Exception):
    """`str(e)` is the whole message shown to the technician; `exit_code` 2 = usage/config, 1 = runtime."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(ProvisioningError):
    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)
