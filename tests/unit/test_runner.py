"""Task outputs parsing, retry backoff and process start times: small pieces of an attempt.

Proves: ``parse_outputs`` keeps ``key=value`` lines with valid keys, ignores
everything else (bad keys, lines without ``=``, undecodable bytes do not
crash it) and never reads past ``OUTPUTS_MAX_BYTES``; ``retry_delay`` is
``seconds * factor**(n-1)`` capped at ``maxSeconds``, reduced by at most the
jitter fraction, and reproducible from a seeded RNG; ``process_start_time``
reads the kernel's start time of a live process whatever its command name;
``bracketed_start_time`` answers only when both clock readings share a tick
(against real processes: tests/integration/test_attempt_start.py).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.executor import retry_delay
from edge_agent.runner import (
    OUTPUTS_MAX_BYTES,
    bracketed_start_time,
    parse_outputs,
    process_start_time,
)
from tideflow.spec import Retry, parse_spec


def retry(**fields: Any) -> Retry:
    """A Retry exactly as a manifest would spell it (camelCase, validated)."""
    spec = parse_spec({"tasks": [{"name": "a", "command": ["x"], "retry": fields}]})
    return spec.retry_for(spec.tasks[0])


# ------------------------------------------------------------------ outputs
def test_parse_outputs_reads_key_value_lines() -> None:
    data = b"rows=42\npath=/data/out.csv\nurl=http://h/?a=b&c=d\nempty=\nspaced = v \n"
    assert parse_outputs(data) == {
        "rows": "42",
        "path": "/data/out.csv",
        "url": "http://h/?a=b&c=d",  # only the first '=' separates
        "empty": "",
        "spaced": " v ",  # the key is trimmed, the value is kept as written
    }


def test_parse_outputs_line_endings_and_overrides() -> None:
    assert parse_outputs(b"a=1\r\nb=2\r\na=3") == {"a": "3", "b": "2"}
    assert parse_outputs(b"") == {}


@pytest.mark.parametrize(
    "line",
    [
        b"no separator here",
        b"=value without key",
        b"1abc=starts with a digit",
        b"-a=starts with a dash",
        b"a b=space in key",
        b"a/b=slash in key",
        b"a:b=colon in key",
        b"cl\xc3\xa9=non-ascii key",
        b"k" * 129 + b"=key longer than 128",
        b"\xff\xfe=undecodable key",
        b"# comment=looks like one",
    ],
)
def test_parse_outputs_ignores_bad_keys(line: bytes) -> None:
    assert parse_outputs(b"good=1\n" + line + b"\nalso_good.x-y=2\n") == {
        "good": "1",
        "also_good.x-y": "2",
    }


def test_parse_outputs_longest_key_accepted() -> None:
    key = "k" * 128
    assert parse_outputs(f"{key}=v".encode()) == {key: "v"}


def test_parse_outputs_undecodable_value_is_replaced_not_fatal() -> None:
    assert parse_outputs(b"blob=\xff\xfeok\n") == {"blob": "\ufffd\ufffdok"}


def test_parse_outputs_never_reads_past_the_bound() -> None:
    filler = b"pad=" + b"x" * 1019 + b"\n"  # 1 KiB lines
    head = b"first=1\n"
    body = head + filler * (OUTPUTS_MAX_BYTES // len(filler) - 1)
    assert len(body) < OUTPUTS_MAX_BYTES
    tail = b"late=2\n" + filler * 10_000  # ~10 MiB beyond the bound
    outputs = parse_outputs(body + filler + tail)
    assert outputs["first"] == "1"
    assert "late" not in outputs
    assert len(outputs["pad"]) <= OUTPUTS_MAX_BYTES


def test_parse_outputs_key_just_inside_the_bound_is_read() -> None:
    last = b"last=ok"
    data = b"x" * (OUTPUTS_MAX_BYTES - len(last) - 1) + b"\n" + last
    assert len(data) == OUTPUTS_MAX_BYTES
    assert parse_outputs(data + b"\nbeyond=no") == {"last": "ok"}


def test_parse_outputs_drops_a_line_cut_by_the_bound() -> None:
    line = b"rows=1234567890\n"
    data = b"x" * (OUTPUTS_MAX_BYTES - 8) + b"\n" + line
    assert "rows" not in parse_outputs(data)


# ------------------------------------------------------------------ backoff
@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"backoff": {"seconds": 1, "factor": 2, "maxSeconds": 300}}, [1, 2, 4, 8, 16, 32]),
        ({"backoff": {"seconds": 0.5, "factor": 3, "maxSeconds": 10}}, [0.5, 1.5, 4.5, 10, 10]),
        ({"backoff": {"seconds": 2, "factor": 1, "maxSeconds": 60}}, [2, 2, 2, 2]),
        ({"backoff": {"seconds": 5, "factor": 2, "maxSeconds": 5}}, [5, 5, 5]),
        ({}, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]),  # the defaults: 1, 2, 300
    ],
    ids=["doubling", "capped", "constant", "cap-equals-base", "defaults"],
)
def test_retry_delay_without_jitter_is_exponential_and_capped(
    fields: dict[str, Any], expected: list[float]
) -> None:
    policy = retry(jitter=0, **fields)
    rng = random.Random(0)
    delays = [retry_delay(policy, n, rng) for n in range(1, len(expected) + 1)]
    assert delays == pytest.approx(expected)


@settings(max_examples=200, deadline=None)
@given(
    seconds=st.floats(0.001, 100),
    factor=st.floats(1, 10),
    cap_over_seconds=st.floats(1, 1000),
    jitter=st.floats(0, 1),
    attempt=st.integers(1, 100),
    seed=st.integers(0, 2**32),
)
def test_retry_delay_stays_within_jitter_bounds(
    seconds: float, factor: float, cap_over_seconds: float, jitter: float, attempt: int, seed: int
) -> None:
    cap = seconds * cap_over_seconds
    policy = retry(jitter=jitter, backoff={"seconds": seconds, "factor": factor, "maxSeconds": cap})
    base = min(cap, seconds * factor ** (attempt - 1))
    delay = retry_delay(policy, attempt, random.Random(seed))
    assert 0 < delay <= base * (1 + 1e-12)
    assert delay >= base * (1 - jitter) * (1 - 1e-12)
    assert delay <= cap * (1 + 1e-12)
    # the same seed gives the same delay
    assert retry_delay(policy, attempt, random.Random(seed)) == delay


def test_retry_delay_jitter_actually_spreads_delays() -> None:
    policy = retry(jitter=0.5, backoff={"seconds": 10, "factor": 2, "maxSeconds": 100})
    rng = random.Random(42)
    delays = [retry_delay(policy, 2, rng) for _ in range(2000)]  # base 20
    assert all(10 < d <= 20 for d in delays)
    assert min(delays) < 10.5 and max(delays) > 19.5
    assert len(set(delays)) > 1900


def test_retry_delay_default_jitter_is_twenty_percent() -> None:
    policy = retry()
    rng = random.Random(3)
    delays = [retry_delay(policy, 1, rng) for _ in range(500)]
    assert all(0.8 < d <= 1.0 for d in delays)
    assert min(delays) < 0.82


def test_retry_delay_large_factor_is_capped_not_overflowing() -> None:
    policy = retry(limit=100, jitter=0, backoff={"seconds": 1, "factor": 10000, "maxSeconds": 60})
    assert retry_delay(policy, 90, random.Random(0)) == 60


# ------------------------------------------------------------- start times
def test_process_start_time_reads_past_a_command_with_spaces_and_parentheses(
    tmp_path: Path,
) -> None:
    """The start time that tells a live process from a reused pid (kill_orphaned_group)
    is the 22nd field of /proc/<pid>/stat, counted after the command's last ")"."""
    odd = tmp_path / "a) b (c"  # the kernel's command name is the file's name (15 bytes max)
    odd.symlink_to(shutil.which("sleep") or "/bin/sleep")
    proc = subprocess.Popen([str(odd), "30"])
    try:
        with open(f"/proc/{proc.pid}/stat", "rb") as handle:
            stat = handle.read()
        assert b"(a) b (c)" in stat
        expected = stat.rsplit(b")", 1)[1].split()[19].decode()
        assert expected.isdigit() and process_start_time(proc.pid) == expected
    finally:
        proc.kill()
        proc.wait()
    assert process_start_time(proc.pid) is None  # reaped: no such process


def test_a_start_that_straddles_a_clock_tick_gets_no_answer() -> None:
    tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    assert bracketed_start_time(5 * tick, 6 * tick - 1) == "5"
    assert bracketed_start_time(6 * tick - 1, 6 * tick) is None
