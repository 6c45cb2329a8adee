"""The bookkeeping after the answer: settles, decision rows and log lines, batched."""

from __future__ import annotations

import queue
import threading

from .. import maillog
from ..config import Config
from ..pipeline import Record, record_together
from .events import log_event

MAX_RECORDS_PER_COMMIT = 64  # messages whose bookkeeping shares one ledger commit, at most
LOG_FLUSH_INTERVAL = 1.0  # the recorder wakes this often when idle, to write the log's due summaries


class Recorder:
    """The bookkeeping that follows the answers, several messages to one ledger commit.

    Each connection hands over its Record once it has answered; this thread
    logs and settles whatever is waiting in one transaction, so under load
    the settle-and-record commit (and its fsync) is shared, and a message
    costs about one commit, its reservation's.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self._waiting: queue.SimpleQueue[Record | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="gate-recorder", daemon=True)
        self._thread.start()

    def put(self, record: Record) -> None:
        self._waiting.put(record)

    def close(self) -> None:
        """Record what is still waiting, then stop."""
        self._waiting.put(None)
        self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = self._take()
            if batch:
                self._record(batch)
            maillog.flush(self.config.log)  # summaries of suppressed lines whose window has ended

    def _record(self, batch: list[Record]) -> None:
        try:
            record_together(batch)
        except Exception as exc:  # noqa: BLE001 - a bug in one batch must not stop the bookkeeping
            log_event(self.config, "err", event="gate-internal-error", records=len(batch),
                 reason=f"{type(exc).__name__}: {exc}")

    def _take(self) -> tuple[list[Record], bool]:
        """What is waiting now (waiting for the first), and whether the gate is stopping."""
        try:
            first = self._waiting.get(timeout=LOG_FLUSH_INTERVAL)
        except queue.Empty:  # quiet for a while: the summaries that are due are written all the same
            return [], False
        if first is None:
            return [], True
        batch = [first]
        while len(batch) < MAX_RECORDS_PER_COMMIT:
            try:
                more = self._waiting.get_nowait()
            except queue.Empty:
                break
            if more is None:
                return batch, True
            batch.append(more)
        return batch, False
