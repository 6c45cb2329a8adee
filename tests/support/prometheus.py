"""Prometheus's own checks of the metrics text: promtool, and a strict reader of the samples."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def promtool() -> str:
    """Debian's promtool: installed, or unpacked into build/tools by scripts/bootstrap."""
    found = shutil.which("promtool") or str(ROOT / "build/tools/usr/bin/promtool")
    assert Path(found).exists(), "promtool is required: run make setup (scripts/bootstrap unpacks it)"
    return found


def check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    """``promtool check metrics``: the format and its lint rules (exit 0 and nothing said when clean)."""
    return subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)


def _unescape(value: str) -> str:
    return re.sub(r'\\(.)', lambda m: {"n": "\n"}.get(m[1], m[1]), value)


def parse(text: str) -> Samples:
    """Every sample as {(name, labels): value}; a line that is not a sample or a comment fails."""
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        labels = frozenset((m[1], _unescape(m[2])) for m in _LABEL.finditer(match[3] or ""))
        samples[(match[1], labels)] = float(match[4])
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample of exactly these labels; 0 when it is absent (a counter not yet counted)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(key)[label] for (found, key) in samples if found == name and label in dict(key)}
