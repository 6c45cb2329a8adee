"""The Prometheus text format as the registry writes it: escaping, counters, cumulative histograms, bounds."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from sendmail_shim.metrics import OTHER, Counter, Registry, escape_label, render, write_textfile
from tests.support.prometheus import check_metrics, parse, value


def test_label_values_are_escaped_so_a_hostile_value_cannot_forge_a_sample() -> None:
    registry = Registry()
    counter = registry.counter("sendmail_shim_test", "Hostile label values.", ("stage",))
    hostile = 'a"} 999\nsendmail_shim_test_total{stage="b\\'
    counter.inc(hostile)
    text = registry.render()
    assert text.count("\n") == 3  # HELP, TYPE and one sample: the newline did not start a second sample
    assert escape_label(hostile) in text
    assert parse(text) == {("sendmail_shim_test_total", frozenset({("stage", hostile)})): 1.0}
    result = check_metrics(text)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_help_text_with_a_newline_stays_one_line() -> None:
    registry = Registry()
    registry.gauge("sendmail_shim_test_value", "first line\nsecond \\ line").set(1)
    assert registry.render().splitlines()[0] == "# HELP sendmail_shim_test_value first line\\nsecond \\\\ line"


def test_counters_are_named_total_and_never_go_down() -> None:
    registry = Registry()
    counter = registry.counter("sendmail_shim_things", "Things.", ("kind",))
    counter.inc("a")
    counter.inc("a", amount=2)
    counter.inc("b")
    text = registry.render()
    assert "# TYPE sendmail_shim_things_total counter" in text
    assert value(parse(text), "sendmail_shim_things_total", kind="a") == 3
    with pytest.raises(ValueError, match="never goes down"):
        counter.inc("a", amount=-1)
    with pytest.raises(ValueError, match="without _total"):
        Counter("sendmail_shim_x_total", "x")


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    registry = Registry()
    histogram = registry.histogram("sendmail_shim_wait_seconds", "Waits.", (0.1, 1, 10))
    for seconds in (0.05, 0.1, 0.5, 2, 20, 30):
        histogram.observe(seconds)
    samples = parse(registry.render())
    buckets = [value(samples, "sendmail_shim_wait_seconds_bucket", le=le) for le in ("0.1", "1", "10", "+Inf")]
    assert buckets == [2, 3, 4, 6]  # 0.1 is in le="0.1": the bounds are inclusive
    assert value(samples, "sendmail_shim_wait_seconds_count") == 6
    assert value(samples, "sendmail_shim_wait_seconds_sum") == pytest.approx(52.65)
    assert check_metrics(registry.render()).returncode == 0


def test_a_histogram_refuses_buckets_out_of_order() -> None:
    with pytest.raises(ValueError, match="increasing order"):
        Registry().histogram("sendmail_shim_x_seconds", "x", (1, 0.5))


def test_label_sets_past_the_bound_are_counted_as_other() -> None:
    counter = Counter("sendmail_shim_bounded", "Bounded.", ("customer",), max_series=3)
    for i in range(10):
        counter.inc(f"c{i}")
    samples = parse(render([counter.family()]))
    assert len(samples) == 4  # c0, c1, c2 and (other)
    assert value(samples, "sendmail_shim_bounded_total", customer=OTHER) == 7
    counter.inc("c1")  # one already known keeps its own series
    assert counter.value("c1") == 2


def test_counting_from_many_threads_loses_nothing() -> None:
    counter = Counter("sendmail_shim_parallel", "Parallel.", ("kind",))

    def work() -> None:
        for _ in range(2000):
            counter.inc("x")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert counter.value("x") == 16000


def test_the_textfile_is_replaced_whole_and_readable(tmp_path: Path) -> None:
    target = tmp_path / "sendmail-shim.prom"
    target.write_text("old\n")
    old_inode = target.stat().st_ino
    write_textfile(str(target), "# HELP a b\n# TYPE a gauge\na 1\n")
    assert target.read_text() == "# HELP a b\n# TYPE a gauge\na 1\n"
    assert target.stat().st_ino != old_inode  # renamed over, never rewritten in place
    assert target.stat().st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["sendmail-shim.prom"]  # no temporary file left behind
