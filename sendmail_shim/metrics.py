"""Metrics in Prometheus's text exposition format (version 0.0.4), written here, not imported.

Counters, gauges and histograms with fixed buckets, each safe to update from any
thread (one small lock per metric: the gate's hot path pays a dict update). A
``Registry`` renders its metrics, and the families its collectors compute at
render time (what the ledger knows), as one text document: ``# HELP`` and
``# TYPE`` lines, ``_total`` counters, cumulative ``_bucket{le=...}`` lines with
``_sum`` and ``_count``, label values escaped as the format says.

Label sets are bounded: a metric keeps at most ``max_series`` of them, and any
further one is counted under the label values ``(other)``, so no input can make
the document grow without end.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER = "(other)"  # the label value that stands for every series past a metric's bound
DEFAULT_MAX_SERIES = 500
Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Sample:
    suffix: str  # "", or a histogram's "_bucket", "_sum", "_count"
    labels: Labels
    value: float


@dataclass(frozen=True)
class Family:
    """One metric as it stands: name, type, help and its samples."""

    name: str
    kind: str  # counter, gauge, histogram
    help: str
    samples: tuple[Sample, ...] = field(default=())

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "type": self.kind, "help": self.help,
                "samples": [{"name": self.name + s.suffix, "labels": dict(s.labels), "value": _json_value(s.value)}
                            for s in self.samples]}


def _json_value(value: float) -> float | int | str:
    if math.isinf(value) or math.isnan(value):
        return format_value(value)
    return int(value) if float(value).is_integer() else value


# ------------------------------------------------------------------ the metrics


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = (), max_series: int = DEFAULT_MAX_SERIES) -> None:
        self.name, self.help, self.labelnames = name, help, tuple(labels)
        self.max_series = max_series
        self._lock = threading.Lock()

    def _key(self, known: Mapping[tuple[str, ...], object], values: Sequence[str]) -> tuple[str, ...]:
        """The series for these label values: their own while the bound allows, else ``(other)``."""
        key = tuple(str(v) for v in values)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name} takes the labels {self.labelnames}, not {key}")
        if key in known or len(known) < self.max_series:
            return key
        return (OTHER,) * len(key)

    def _labels(self, key: tuple[str, ...]) -> Labels:
        return tuple(zip(self.labelnames, key, strict=True))


class Counter(_Metric):
    """A count that only grows; exposed as ``NAME_total`` (the 0.0.4 format names the family so too)."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = (), max_series: int = DEFAULT_MAX_SERIES) -> None:
        if name.endswith("_total"):
            raise ValueError("a counter's name is given without _total")
        super().__init__(name, help, labels, max_series)
        self._values: dict[tuple[str, ...], float] = {}
        if not self.labelnames:
            self._values[()] = 0.0  # a counter without labels is there from the start, at 0

    def inc(self, *values: str, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("a counter never goes down")
        with self._lock:
            key = self._key(self._values, values)
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, *values: str) -> float:
        with self._lock:
            return self._values.get(tuple(values), 0.0)

    def family(self) -> Family:
        with self._lock:
            items = sorted(self._values.items())
        return Family(self.name + "_total", self.kind, self.help,
                      tuple(Sample("", self._labels(k), v) for k, v in items))


class Gauge(_Metric):
    """A value that goes up and down, set by the program or read from ``source`` at render time."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labels: Sequence[str] = (), max_series: int = DEFAULT_MAX_SERIES,
                 source: Callable[[], float] | None = None) -> None:
        super().__init__(name, help, labels, max_series)
        self._values: dict[tuple[str, ...], float] = {}
        self.source = source

    def set(self, value: float, *values: str) -> None:
        with self._lock:
            self._values[self._key(self._values, values)] = float(value)

    def add(self, amount: float, *values: str) -> None:
        with self._lock:
            key = self._key(self._values, values)
            self._values[key] = self._values.get(key, 0.0) + amount

    def family(self) -> Family:
        if self.source is not None:
            return Family(self.name, self.kind, self.help, (Sample("", (), float(self.source())),))
        with self._lock:
            items = sorted(self._values.items())
        return Family(self.name, self.kind, self.help, tuple(Sample("", self._labels(k), v) for k, v in items))


class Histogram(_Metric):
    """Observations counted into fixed buckets (upper bounds, in the metric's unit), with their sum."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float], labels: Sequence[str] = (),
                 max_series: int = DEFAULT_MAX_SERIES) -> None:
        if list(buckets) != sorted(set(buckets)) or not buckets:
            raise ValueError("a histogram's buckets are distinct upper bounds in increasing order")
        super().__init__(name, help, labels, max_series)
        self.buckets = tuple(float(b) for b in buckets if not math.isinf(b))
        self._series: dict[tuple[str, ...], list[float]] = {}  # per-bucket counts, then +Inf count, then sum
        if not self.labelnames:
            self._series[()] = [0.0] * (len(self.buckets) + 2)

    def observe(self, value: float, *values: str) -> None:
        with self._lock:
            key = self._key(self._series, values)
            counts = self._series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1  # only its own bucket: the cumulative counts are made when rendered
                    break
            else:
                counts[len(self.buckets)] += 1
            counts[-1] += value

    def family(self) -> Family:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        samples: list[Sample] = []
        for key, counts in items:
            labels = self._labels(key)
            running = 0.0
            for bound, count in zip((*self.buckets, math.inf), counts[:-1], strict=True):
                running += count
                samples.append(Sample("_bucket", (*labels, ("le", format_value(bound))), running))
            samples.append(Sample("_sum", labels, counts[-1]))
            samples.append(Sample("_count", labels, running))
        return Family(self.name, self.kind, self.help, tuple(samples))


# ------------------------------------------------------------------ the registry

Collector = Callable[[], Iterable[Family]]
_M = TypeVar("_M", Counter, Gauge, Histogram)


class Registry:
    """The metrics of one program, and the collectors that add families when it is rendered."""

    def __init__(self) -> None:
        self._metrics: list[Counter | Gauge | Histogram] = []
        self._collectors: list[Collector] = []

    def counter(self, name: str, help: str, labels: Sequence[str] = (), **options: int) -> Counter:
        return self._add(Counter(name, help, labels, **options))

    def gauge(self, name: str, help: str, labels: Sequence[str] = (),
              source: Callable[[], float] | None = None) -> Gauge:
        return self._add(Gauge(name, help, labels, source=source))

    def histogram(self, name: str, help: str, buckets: Sequence[float], labels: Sequence[str] = ()) -> Histogram:
        return self._add(Histogram(name, help, buckets, labels))

    def collect(self, collector: Collector) -> None:
        self._collectors.append(collector)

    def _add(self, metric: _M) -> _M:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"{metric.name} is registered already")
        self._metrics.append(metric)
        return metric

    def families(self) -> list[Family]:
        found = [m.family() for m in self._metrics]
        for collector in self._collectors:
            found.extend(collector())
        return found

    def render(self) -> str:
        return render(self.families())


# ------------------------------------------------------------------ the text format


def render(families: Iterable[Family]) -> str:
    """The exposition document: each family's HELP and TYPE lines, then its samples."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for sample in family.samples:
            lines.append(f"{family.name}{sample.suffix}{format_labels(sample.labels)} {format_value(sample.value)}")
    return "\n".join(lines) + "\n" if lines else ""


def format_labels(labels: Labels) -> str:
    """``{name="value",...}``; an empty value is left out, as Prometheus reads it the same as no label."""
    shown = [f'{name}="{escape_label(value)}"' for name, value in labels if value != ""]
    return "{" + ",".join(shown) + "}" if shown else ""


def escape_label(value: str) -> str:
    """Backslash, double quote and line feed escaped, as the format requires of label values."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


# ------------------------------------------------------------------ node-exporter's textfile


def write_textfile(path: str, text: str) -> None:
    """Replace ``path`` atomically, as node-exporter's textfile collector needs: it never reads half a file.

    The text goes to a temporary file beside it, is synced, made readable (0644) and renamed over it.
    """
    directory = os.path.dirname(path) or "."
    handle, temporary = tempfile.mkstemp(prefix=".sendmail-shim-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
