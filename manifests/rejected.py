"""How a worker ends one row with a stable reason code instead of an exception's class name.

`Rejected`: raised by readers, decoders, stages and workers (or returned for one item of a batch) to end a
row as *rejected*: a bad input, a gate that fails, an unusable model output.
`ItemFailed`: returned for one item of a batch to end that row as *failed* with a reason code ("oom"): an
error of the system, not a verdict on the pair, that spares the rest of the batch. Any other exception fails
its row with the exception's class name."""
from __future__ import annotations


class Rejected(Exception):
    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason  # snake_case code for the ledger
        self.message = message


class ItemFailed(Exception):
    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message
