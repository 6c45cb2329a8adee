"""The texts of the notices: built-in templates per kind and language, or the admin's own.

A template is a file named ``KIND.LANGUAGE.txt`` (``warn.en.txt``): a first
line ``Subject: ...``, an empty line, then the body, with ``$placeholders``
(``string.Template``). The built-in ones are package data in
``sendmail_shim/templates/``; a file of the same name in ``[notify] templates``
replaces one. Each is checked when the config is loaded, so a misspelt
placeholder is a config error, not a notice that fails when it is due.
"""

from __future__ import annotations

import functools
import os
import string
from dataclasses import dataclass

KINDS = ("warn", "limit", "block")
LANGUAGES = ("en", "nb")
_COMMON = ("who", "account", "customer", "hostname")
_RULE_FACTS = ("rule", "rule_words", "used", "limit", "window", "window_start", "free_at", "free_in", "scripts")
PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "warn": (*_COMMON, *_RULE_FACTS, "percent"),
    "limit": (*_COMMON, *_RULE_FACTS),
    "block": (*_COMMON, "reason", "at"),
}
_MAX_SIZE = 64 * 1024  # a notice is a short text; anything larger is a mistake


class TemplateError(Exception):
    """A template that cannot be used: ``str(exc)`` says which file and what is wrong."""


@dataclass(frozen=True)
class NoticeTemplate:
    kind: str
    language: str
    subject: string.Template
    body: string.Template
    source: str  # "built-in" or the file's path

    def render(self, values: dict[str, str]) -> tuple[str, str]:
        """The subject line and the body for these facts."""
        return self.subject.substitute(values), self.body.substitute(values)


def file_name(kind: str, language: str) -> str:
    return f"{kind}.{language}.txt"


def parse(kind: str, language: str, text: str, source: str) -> NoticeTemplate:
    """Check a template's form and placeholders; raise TemplateError naming ``source``."""
    head, blank, body = text.replace("\r\n", "\n").partition("\n\n")
    if not blank or not head.startswith("Subject:") or "\n" in head:
        raise TemplateError(f"{source}: must start with one line 'Subject: ...' and an empty line before the body")
    subject = string.Template(head[len("Subject:"):].strip())
    template = string.Template(body.rstrip("\n") + "\n")
    allowed = PLACEHOLDERS[kind]
    for part in (subject, template):
        if not part.is_valid():
            raise TemplateError(f"{source}: a '$' that starts no placeholder (write $$ for a dollar sign)")
        unknown = sorted(set(part.get_identifiers()) - set(allowed))
        if unknown:
            raise TemplateError(f"{source}: unknown placeholder ${unknown[0]} "
                                f"(a {kind} notice knows: {', '.join('$' + p for p in allowed)})")
    if not subject.template:
        raise TemplateError(f"{source}: the subject is empty")
    return NoticeTemplate(kind, language, subject, template, source)


@functools.cache
def builtin(kind: str, language: str) -> NoticeTemplate:
    """The packaged text, read when first needed (a config without overrides reads no template)."""
    name = file_name(kind, language)
    path = os.path.join(os.path.dirname(__file__), "templates", name)
    return parse(kind, language, _read(path), f"built-in {name}")


def load(language: str, directory: str | None) -> dict[str, NoticeTemplate]:
    """The directory's templates in ``language``, checked, by kind; kinds it has no file for are absent."""
    chosen: dict[str, NoticeTemplate] = {}
    for kind in KINDS:
        path = os.path.join(directory, file_name(kind, language)) if directory else None
        if path is not None and os.path.exists(path):
            chosen[kind] = parse(kind, language, _read(path), path)
    return chosen


def _read(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_SIZE + 1)
    except OSError as exc:
        raise TemplateError(f"{path}: cannot be read ({exc.strerror})") from None
    if len(data) > _MAX_SIZE:
        raise TemplateError(f"{path}: larger than {_MAX_SIZE // 1024} KiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise TemplateError(f"{path}: not UTF-8") from None


# Words the notices use for windows and metrics, per language: "5 minutes", "5 minutter".
_UNITS = {
    "en": {"day": ("day", "days"), "hour": ("hour", "hours"), "minute": ("minute", "minutes"),
           "second": ("second", "seconds")},
    "nb": {"day": ("dag", "dager"), "hour": ("time", "timer"), "minute": ("minutt", "minutter"),
           "second": ("sekund", "sekunder")},
}
_METRICS = {"en": {"messages": "messages", "recipients": "recipients"},
            "nb": {"messages": "meldinger", "recipients": "mottakere"}}
_PER = {"en": "per", "nb": "per"}


def window_words(seconds: int, language: str) -> str:
    """``300`` -> ``5 minutes`` (``5 minutter``)."""
    units = _UNITS[language]
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute"), (1, "second")):
        if seconds % size == 0:
            count = seconds // size
            one, many = units[unit]
            return f"{count} {one if count == 1 else many}"
    return f"{seconds} s"  # unreachable: every window is whole seconds


def rule_words(limit: int, metric: str, window_seconds: int, language: str) -> str:
    """``10 messages per 5 minutes`` (``10 meldinger per 5 minutter``)."""
    return f"{limit} {_METRICS[language][metric]} {_PER[language]} {window_words(window_seconds, language)}"


def who_words(scope: str, subject: str, language: str) -> str:
    """The account itself, or the customer with all its accounts."""
    if scope == "account":
        return subject
    return f"kunde {subject} (alle kontoene samlet)" if language == "nb" else \
        f"customer {subject} (all its accounts together)"


def script_lines(scripts: list[tuple[str, int]], language: str) -> str:
    """One line per script, most first: ``  7  /home/web1/www/form.php``."""
    if not scripts:
        return "  (ingen skript registrert)" if language == "nb" else "  (none recorded)"
    unit = {"en": ("message", "messages"), "nb": ("melding", "meldinger")}[language]
    return "\n".join(f"  {count:>4} {unit[0] if count == 1 else unit[1]}  {script}" for script, count in scripts)
