"""The gate's notice thread: every notice handed over is tried, and the thread ends when idle.

A reload replaces the runtime and with it the notifier; a thread that waited for work
forever would stay behind after every reload.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from sendmail_shim import notify
from sendmail_shim.config import from_mapping

CONFIG = {"upstream": {"host": "smtp.example.net"}, "spf": {"relay_ips": ["192.0.2.25"]},
          "notify": {"from": "varsel@provider.example"}}


def notice_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "gate-notices"]


def wait_until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_every_notice_is_tried_and_the_idle_thread_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notify, "IDLE_THREAD_EXIT", 0.2)
    tried: list[str] = []
    notifier = notify.Notifier(from_mapping(CONFIG), ledger=None, upstream=None,  # type: ignore[arg-type]
                               hostname="vm", background=True)
    monkeypatch.setattr(notifier, "_attempt", lambda queue_id, fields: tried.append(queue_id))
    for n in range(50):
        notifier._hand_over(f"q{n}", {})
    wait_until(lambda: len(tried) == 50)
    assert tried == [f"q{n}" for n in range(50)]  # in order, on one thread
    wait_until(lambda: not notice_threads())
    notifier._hand_over("q-after", {})  # a new thread for the next notice
    wait_until(lambda: tried[-1:] == ["q-after"])
    wait_until(lambda: not notice_threads())
