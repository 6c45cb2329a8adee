"""Memory for large messages: shares of ``[gate] upload_memory`` and turns per Unix user."""

from __future__ import annotations

import threading
import time

from ..config import Config
from .events import user_label

LARGE_MESSAGE = 1024 * 1024  # a message past this many bytes waits for a share of [gate] upload_memory
# What the gate holds at its peak per byte of a message: the input, its lines, the bytes for DATA
# (measured with tracemalloc: about 3.5; the rest is room for the allocator).
MEMORY_PER_BYTE = 4


class UploadsBusy(Exception):
    """A large message found no share of ``[gate] upload_memory`` in time; nothing was sent (exit 69)."""


class UploadBudget:
    """``[gate] upload_memory``, shared out among the large messages being read and processed.

    A message's size is known only at its end. One that grows past
    ``LARGE_MESSAGE`` takes, before it is read on, a share for the largest
    message allowed (``MEMORY_PER_BYTE`` x ``[message] max_size``, at most the
    whole budget); at its end the share shrinks to what its own size needs,
    and it is given back once the verdict is decided. A share covers the
    whole message, so no two messages can each hold part of the budget and
    wait for the rest. At most ``[gate] max_uploads_per_uid`` shares go to
    one Unix user at once, so one customer cannot hold the whole budget; the
    others wait their turn, in the caller's ``request_timeout``.
    """

    def __init__(self, config: Config) -> None:
        self.total, self.per_uid = config.gate.upload_memory, config.gate.max_uploads_per_uid
        self.largest = min(self.total, MEMORY_PER_BYTE * config.message.max_size)
        self.used = 0
        self.holders: dict[int, int] = {}
        self._changed = threading.Condition()

    def take(self, uid: int, until: float) -> int:
        """A share for the largest message, waiting for it until ``until``; raises UploadsBusy."""
        with self._changed:
            while self.holders.get(uid, 0) >= self.per_uid or self.used + self.largest > self.total:
                remaining = until - time.monotonic()
                if remaining <= 0:
                    raise UploadsBusy(self._busy_line(uid))
                self._changed.wait(remaining)
            self.used += self.largest
            self.holders[uid] = self.holders.get(uid, 0) + 1
        return self.largest

    def shrink(self, share: int, size: int) -> int:
        """The share cut down to what a message of ``size`` bytes needs."""
        smaller = min(share, MEMORY_PER_BYTE * size)
        with self._changed:
            self.used -= share - smaller
            self._changed.notify_all()
        return smaller

    def give_back(self, uid: int, share: int) -> None:
        with self._changed:
            self.used -= share
            self.holders[uid] -= 1
            if not self.holders[uid]:
                del self.holders[uid]
            self._changed.notify_all()

    def _busy_line(self, uid: int) -> str:
        if self.holders.get(uid, 0) >= self.per_uid:
            return (f"the Unix user {user_label(uid)} already has {self.per_uid} large message(s) in progress "
                    f"at the mail gate, the most allowed at once, and this one found no turn in time; "
                    f"try again in a moment")
        return "the mail gate is busy with other large messages and this one found no turn in time; " \
               "try again in a moment"
