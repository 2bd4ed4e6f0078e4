"""Prometheus metrics: pushed to the real Pushgateway, and kept in a textfile-collector file.

The Pushgateway is Debian's ``prometheus-pushgateway`` (``scripts/test.sh`` installs it), started
here on a free port of 127.0.0.1. A missing binary is a failure with a clear message, not a
skip. Values are read back over its HTTP API (``/api/v1/metrics``) while the export runs and at
the end, and checked against the manifest; no password of the DSN may appear in what was pushed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_ok, assert_one_error_line, export_cmd, read_manifest, run
from prometheus_client.parser import text_string_to_metric_families

from copystream import Progress, export_table, finish_shards, plan_shards, run_shard
from copystream.export import peak_rss
from copystream.retry import Failure, Retrier, RetryPolicy

RunSql = Callable[[str, str], list[tuple[Any, ...]]]

PUSHGATEWAY = "/usr/bin/prometheus-pushgateway"
ROWS = 20_000
SECRET = "n0t-a-real-Passw0rd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[str]:
    """The URL of a real Pushgateway started for this test."""
    if not os.access(PUSHGATEWAY, os.X_OK):
        pytest.fail(
            f"{PUSHGATEWAY} not found: install Debian's prometheus-pushgateway "
            "(scripts/test.sh does, as root)",
            pytrace=False,
        )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "pushgateway.log").open("wb")
    proc = subprocess.Popen(
        [PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    said = (tmp_path / "pushgateway.log").read_text()
                    pytest.fail(f"the Pushgateway did not start: {said}")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def pushed(url: str) -> dict[str, float]:
    """Every copystream sample the gateway holds, as ``name{label=value,...}`` → value."""
    with urllib.request.urlopen(url + "/api/v1/metrics", timeout=5) as r:
        groups = json.load(r)["data"]
    out: dict[str, float] = {}
    for group in groups:
        for name, family in group.items():
            if not name.startswith("copystream_") or not isinstance(family, dict):
                continue
            for m in family["metrics"]:
                labels = ",".join(f"{k}={v}" for k, v in sorted(m["labels"].items()))
                if "value" in m:
                    out[f"{name}{{{labels}}}"] = float(m["value"])
                else:  # a histogram: its count
                    out[f"{name}_count{{{labels}}}"] = float(m["count"])
    return out


def raw_metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        return str(r.read().decode())


def value(samples: dict[str, float], name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    want = [f"{k}={v}" for k, v in labels.items()]
    found = [
        v for k, v in samples.items()
        if k.split("{")[0] == name and set(want) <= set(k.split("{")[1].rstrip("}").split(","))
    ]  # fmt: skip
    assert len(found) == 1, f"{name} {labels}: {found} in {sorted(samples)}"
    return found[0]


def make_table(dsn: str, run_sql: RunSql) -> None:
    run_sql(
        dsn,
        f"""CREATE TABLE t (id int PRIMARY KEY, v text);
            INSERT INTO t SELECT g, repeat('x', 50) || g FROM generate_series(1, {ROWS}) g;""",
    )


@pytest.mark.all_versions  # quick: also on PostgreSQL 18 (.ci/run)
def test_pushed_during_and_after_an_export_match_the_manifest(
    dsn: str, run_sql: RunSql, tmp_path: Path, pushgateway: str
) -> None:
    make_table(dsn, run_sql)
    out = tmp_path / "t.csv"
    during: list[float] = []
    started = time.time()

    def watch(p: Progress) -> None:
        # once a few chunks are in, wait until a push shows rows but not all of them yet
        if during or p.chunks < 3:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            samples = pushed(pushgateway)
            rows = [v for k, v in samples.items() if k.startswith("copystream_rows{")]
            if rows and rows[0] > 0:
                during.append(rows[0])
                return
            time.sleep(0.05)
        during.append(-1)

    result = export_table(
        f"{dsn} password={SECRET}", "t", out, chunk_rows=1000, progress=watch,
        pushgateway=pushgateway, metrics_interval=0.1,
    )  # fmt: skip
    assert during and 0 < during[0] < ROWS, f"no push seen during the export: {during}"
    m = read_manifest(out)
    samples = pushed(pushgateway)
    lb = {"table": "public.t", "shard": "all", "job": "copystream"}
    assert value(samples, "copystream_rows", **lb) == m["rows"] == result.rows == ROWS
    assert value(samples, "copystream_bytes", kind="stored", **lb) == m["bytes"]
    assert value(samples, "copystream_bytes", kind="raw", **lb) == m["bytes"]  # uncompressed
    assert value(samples, "copystream_chunks", **lb) == len(m["chunks"]) == 20
    # every chunk timed: the first from the start of the run
    assert value(samples, "copystream_chunk_duration_seconds_count", **lb) == 20
    assert value(samples, "copystream_last_success_timestamp_seconds", **lb) >= started
    assert value(samples, "copystream_last_chunk_timestamp_seconds", **lb) >= started
    # the peak of this (pytest) process (Linux's VmHWM, read now): what earlier tests loaded
    # into it counts too, so no fixed ceiling
    peak = peak_rss()
    assert 10e6 < value(samples, "copystream_peak_rss_bytes", **lb) <= peak
    text = raw_metrics(pushgateway)
    assert SECRET not in text and "password" not in text


def test_metrics_file_of_a_compressed_cli_export(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    make_table(dsn, run_sql)
    out = tmp_path / "t.csv.zst"
    prom = tmp_path / "copystream.prom"
    proc = run(export_cmd(f"{dsn} password={SECRET}", "t", out, "--chunk-rows", "5000",
                          "--metrics-file", str(prom), "--consistent"))  # fmt: skip
    assert_ok(proc)
    m = read_manifest(out)
    text = prom.read_text()
    assert SECRET not in text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    lb = (("shard", "all"), ("table", "public.t"))

    def at(name: str, *extra: tuple[str, str]) -> float:
        return samples[(name, tuple(sorted(lb + extra)))]

    assert at("copystream_rows") == ROWS == m["rows"]
    assert at("copystream_bytes", ("kind", "stored")) == m["bytes"] == out.stat().st_size
    assert at("copystream_bytes", ("kind", "raw")) == m["uncompressed_bytes"] > m["bytes"]
    assert at("copystream_chunks") == len(m["chunks"]) == 4
    assert at("copystream_snapshot_age_seconds") >= 0
    assert at("copystream_last_success_timestamp_seconds") > 0
    # rewritten atomically: nothing but the file itself is left in the directory
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [out.name, out.name + ".manifest.json", prom.name]
    )


def test_metrics_file_in_a_missing_directory_is_refused(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    make_table(dsn, run_sql)
    out = tmp_path / "t.csv"
    proc = run(export_cmd(dsn, "t", out, "--metrics-file", str(tmp_path / "no" / "m.prom")))
    assert_one_error_line(proc, 2, "--metrics-file", "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_pushgateway_does_not_stop_the_export(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    make_table(dsn, run_sql)
    out = tmp_path / "t.csv"
    gone = f"http://exporter:{SECRET}@127.0.0.1:{free_port()}"
    proc = run(export_cmd(dsn, "t", out, "--pushgateway", gone))
    assert_ok(proc)
    assert "could not push metrics to http://127.0.0.1:" in proc.stderr
    assert SECRET not in proc.stderr
    assert read_manifest(out)["rows"] == ROWS


def test_retries_by_reason_and_outage_seconds() -> None:
    """Pure: the retrier counts retries by reason (outages as one) and ends outage streaks."""
    now = [0.0]
    kinds = {"lost": Failure("connection lost (x)", outage=True), "dl": Failure("deadlock")}
    r = Retrier(
        RetryPolicy(), sleep=lambda s: None, clock=lambda: now[0],
        classifier=lambda e: kinds[str(e)],
    )  # fmt: skip
    for what in ("lost", "lost", "dl"):
        r.wait(r.failed(Exception(what)), "chunk 0")
        now[0] += 2.0
    r.succeeded("chunk 0")
    assert r.by_reason == {"outage": 2, "deadlock": 1}
    assert r.outage_seconds == pytest.approx(6.0)


@pytest.mark.all_versions  # quick: also on PostgreSQL 18 (.ci/run)
def test_each_shard_pushes_its_own_group(
    dsn: str, run_sql: RunSql, tmp_path: Path, pushgateway: str
) -> None:
    make_table(dsn, run_sql)
    plan = plan_shards(dsn, "t", tmp_path / "t.csv", shards=2, pushgateway=pushgateway)
    results = [run_shard(plan, i) for i in range(plan.shards)]
    samples = pushed(pushgateway)
    for r in results:
        lb = {"table": "public.t", "shard": str(r.index), "job": "copystream"}
        assert value(samples, "copystream_rows", **lb) == r.rows > 0
        assert value(samples, "copystream_bytes", kind="stored", **lb) == r.bytes
        assert value(samples, "copystream_last_success_timestamp_seconds", **lb) > 0
    assert sum(r.rows for r in results) == ROWS == finish_shards(plan).rows


@pytest.mark.all_versions  # quick: also on PostgreSQL 18 (.ci/run)
def test_workers_metrics_are_the_sum_of_the_ranges(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    make_table(dsn, run_sql)
    out, prom = tmp_path / "t.csv", tmp_path / "m.prom"
    result = export_table(dsn, "t", out, workers=2, chunk_rows=2_000, metrics_file=str(prom))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(prom.read_text())
        for s in family.samples
    }
    lb = (("shard", "all"), ("table", "public.t"))
    assert samples[("copystream_rows", lb)] == result.rows == ROWS
    assert samples[("copystream_chunks", lb)] == len(result.chunks) == 10
    # every chunk timed, from the pool's progress events (a few a second: averaged over the
    # chunks committed between two of them)
    assert samples[("copystream_chunk_duration_seconds_count", lb)] == 10
