"""What was sent, queued, refused and bounced in a time range, grouped by account, customer,
script or uid: the ``report`` command's data.

Two queries over the range, both through an index: the decisions (index on
``at``) and the queue's finished messages (index ``queue_finished``). A
bounced recipient counts in the range its message was finished in; for the
script and uid views it is matched to its ``queued`` decision by Message-ID.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInput
from .store import Store

GROUPINGS = {"account": "account", "customer": "customer_id", "uid": "uid",
             "script": "COALESCE(script, exe)"}
TOP_SCRIPTS = 3
MATCH_BEFORE, MATCH_AFTER = 60.0, 3600.0  # a queued decision is recorded just after its queue row


@dataclass
class Group:
    """One account, customer, script or uid (key None: decisions without one)."""

    key: str | int | None
    sent: int = 0
    queued: int = 0
    refused_by_reason: Counter[str] = field(default_factory=Counter)
    bounced: int = 0  # recipients the queue gave up on (each sender got a bounce)
    recipients: int = 0  # of the messages sent or queued
    users: Counter[str] = field(default_factory=Counter)  # Unix user (or "uid N") -> messages
    scripts: Counter[str] = field(default_factory=Counter)

    @property
    def refused(self) -> int:
        return sum(self.refused_by_reason.values())

    @property
    def top_scripts(self) -> list[tuple[str, int]]:
        return sorted(self.scripts.items(), key=lambda item: (-item[1], item[0]))[:TOP_SCRIPTS]

    @property
    def mail(self) -> int:
        return self.sent + self.queued


@dataclass(frozen=True)
class Report:
    by: str
    since: float
    until: float
    groups: list[Group]


def build(store: Store, by: str, since: float, until: float) -> Report:
    """The groups of ``by`` with any decision or bounce in [since, until), most mail first."""
    if by not in GROUPINGS:
        raise InvalidInput(f"{by!r} is not a grouping (account, customer, script or uid)")
    groups: dict[Any, Group] = {}

    def group(key: Any) -> Group:
        return groups.setdefault(key, Group(key))

    with store.read() as tx:
        rows = tx.rows(
            f"SELECT {GROUPINGS[by]} AS k, verdict, stage, unix_user, uid, COALESCE(script, exe) AS s, "
            "COUNT(*), COALESCE(SUM(recipients), 0) FROM decisions WHERE at >= :since AND at < :until "
            f"GROUP BY {GROUPINGS[by]}, verdict, stage, unix_user, uid, COALESCE(script, exe)",
            {"since": since, "until": until})
        bounces = _bounces(tx, by, since, until)
    for key, verdict, stage, user, uid, script, count, recipients in rows:
        found = group(key)
        count = int(count)
        if verdict == "sent":
            found.sent += count
        elif verdict == "queued":
            found.queued += count
        else:
            found.refused_by_reason[str(stage or verdict or "unknown")] += count
        if verdict in ("sent", "queued"):
            found.recipients += int(recipients)
        if user is not None or uid is not None:
            found.users[str(user) if user is not None else f"uid {uid}"] += count
        if script is not None:
            found.scripts[str(script)] += count
    for key, failed in bounces.items():
        group(key).bounced += failed
    ordered = sorted(groups.values(), key=lambda g: (-g.mail, -g.refused, -g.bounced, str(g.key)))
    return Report(by, since, until, ordered)


def _bounces(tx: Any, by: str, since: float, until: float) -> Counter[Any]:
    """Failed recipients of the messages the queue finished in the range, by group."""
    if by in ("account", "customer"):
        column = "q.account" if by == "account" else "q.customer_id"
        rows = tx.rows(
            f"SELECT {column}, COUNT(*) FROM queue_messages q JOIN queue_recipients r ON r.queue_id = q.id "
            "WHERE q.state = 'done' AND q.finished_at >= :since AND q.finished_at < :until "
            f"AND q.kind = 'message' AND r.state = 'failed' GROUP BY {column}",
            {"since": since, "until": until})
        return Counter({key: int(n) for key, n in rows})
    rows = tx.rows(
        f"SELECT q.id, COUNT(*), (SELECT {'d.uid' if by == 'uid' else 'COALESCE(d.script, d.exe)'} "
        "FROM decisions d WHERE d.at >= q.created_at - :before AND d.at < q.created_at + :after "
        "AND d.message_id = q.message_id AND d.verdict = 'queued' ORDER BY d.at LIMIT 1) "
        "FROM queue_messages q JOIN queue_recipients r ON r.queue_id = q.id "
        "WHERE q.state = 'done' AND q.finished_at >= :since AND q.finished_at < :until "
        "AND q.kind = 'message' AND r.state = 'failed' GROUP BY q.id, q.created_at, q.message_id",
        {"since": since, "until": until, "before": MATCH_BEFORE, "after": MATCH_AFTER})
    found: Counter[Any] = Counter()
    for _id, n, key in rows:
        found[key] += int(n)
    return found


def by_reason(group: Group) -> dict[str, int]:
    """The refusals by reason, most first (a plain dict, for JSON)."""
    return dict(sorted(group.refused_by_reason.items(), key=lambda item: (-item[1], item[0])))


__all__ = ["GROUPINGS", "Group", "Report", "build", "by_reason"]
