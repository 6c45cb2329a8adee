"""The gate's log lines, and the names they give a caller."""

from __future__ import annotations

from .. import maillog
from ..config import Config

_NAMES: dict[int, str] = {}  # uids already named: the busy line must not cost an NSS lookup each


def user_name(uid: int) -> str | None:
    import pwd

    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return None
    _NAMES[uid] = name
    return name


def user_label(uid: int) -> str:
    return _NAMES.get(uid) or f"uid {uid}"


def log_event(config: Config, priority: str, **fields: object) -> None:
    maillog.write(config.log, fields, priority)
