"""The one typed rejection: raised by readers, decoders, stages and workers to end a row as *rejected* with a
stable reason code (a bad input, a gate that fails, an unusable model output), as opposed to *failed* (a bug
or an error of the system, recorded with its exception class)."""
from __future__ import annotations


class Rejected(Exception):
    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason  # snake_case code for the ledger
        self.message = message
