"""Every field of each daemon's settings object has a flag and a ``TIDEFLOW_*`` variable.

For the operator's :class:`OperatorConfig` and the agent's :class:`AgentConfig`
(nested settings included: the :class:`BrokerConnection`, the agent's
``SyncConfig``), each field is set once through its environment variable and
once through its flag, on a real parser, and the settings object the CLI
builds from it must carry the value.  A new field without a flag, or a flag
that does not reach its field, fails here; so does a field this test has no
sample value for (add one below).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_agent import cli as agent_cli
from edge_agent.daemon import AgentConfig
from tideflow.mqtt import BrokerConnection
from tideflow.settings import env_name
from tideflow_operator import cli as operator_cli
from tideflow_operator.runtime import OperatorConfig

# field -> (variable's text, argv after ``run``, the value the field must then hold)
Sample = tuple[str, list[str], Any]
COMMON: dict[str, Sample] = {
    "broker.url": ("mqtts://b.example:8883", ["--broker", "mqtts://b.example:8883"],
                   "mqtts://b.example:8883"),
    "broker.username": ("u-1", ["--username", "u-1"], "u-1"),
    "broker.password_file": ("/run/pw", ["--password-file", "/run/pw"], Path("/run/pw")),
    "broker.tls_ca": ("/run/ca.pem", ["--tls-ca", "/run/ca.pem"], Path("/run/ca.pem")),
    "metrics_port": ("9123", ["--metrics-port", "9123"], 9123),
    "ttl_seconds_after_finished": ("600", ["--ttl-seconds-after-finished", "600"], 600),
}  # fmt: skip
OPERATOR: dict[str, Sample] = {
    **COMMON,
    "auto_register": ("1", ["--no-auto-register"], False),
    "agent_labels": ("1", ["--no-agent-labels"], False),
    "client_id": ("op-x", ["--client-id", "op-x"], "op-x"),
    "status_max_tasks": ("77", ["--status-max-tasks", "77"], 77),
    "housekeeping_seconds": ("2.5", ["--housekeeping-seconds", "2.5"], 2.5),
    "namespaces": ("team-a", ["--namespace", "team-a"], ["team-a"]),
    "ledger_namespace": ("ops", ["--lease-namespace", "ops"], "ops"),
    "reconcile_seconds": ("7.5", ["--reconcile-seconds", "7.5"], 7.5),
    "leader_election": ("0", ["--no-leader-election"], False),
    "lease_name": ("lease-x", ["--lease-name", "lease-x"], "lease-x"),
    "peering": ("peers", ["--peering", "peers"], "peers"),
    "liveness": ("http://0.0.0.0:9/h", ["--liveness", "http://0.0.0.0:9/h"], "http://0.0.0.0:9/h"),
    "mqtt5": ("3.1.1", ["--mqtt-version", "3.1.1"], False),
    "site_silence_seconds": ("45", ["--site-silence-seconds", "45"], 45.0),
    "shard_index": ("2", ["--shard-index", "2"], 2),
    "shard_count": ("3", ["--shard-count", "3"], 3),
}  # fmt: skip
AGENT: dict[str, Sample] = {
    **COMMON,
    "site": ("line-9", ["--site", "line-9"], "line-9"),
    "db": ("/data/x.db", ["--db", "/data/x.db"], Path("/data/x.db")),
    "concurrency": ("3", ["--concurrency", "3"], 3),
    "pass_env": ("AWS_*", ["--pass-env", "AWS_*"], ["AWS_*"]),
    "synchronous": ("normal", ["--synchronous", "normal"], "NORMAL"),
    "heartbeat_seconds": ("4.5", ["--heartbeat-seconds", "4.5"], 4.5),
    "max_message_bytes": ("4096", ["--max-message-bytes", "4096"], 4096),
    "tracing": ("1", ["--no-tracing"], False),
    "labels": ("k=v", ["--labels", "k=v"], {"k": "v"}),
    "sync.batch_count": ("11", ["--sync-batch-count", "11"], 11),
    "sync.batch_bytes": ("2048", ["--sync-batch-bytes", "2048"], 2048),
    "sync.window_batches": ("2", ["--sync-window-batches", "2"], 2),
    "sync.max_window_batches": ("8", ["--sync-max-window-batches", "8"], 8),
    "sync.fast_ack_seconds": ("0.5", ["--sync-fast-ack-seconds", "0.5"], 0.5),
    "sync.ack_timeout": ("3.5", ["--ack-timeout", "3.5"], 3.5),
    "sync.max_ack_timeout": ("45", ["--max-ack-timeout", "45"], 45.0),
    "sync.idle_poll": ("0.25", ["--sync-idle-poll", "0.25"], 0.25),
    "sync.budget_bytes": ("1000", ["--outbox-budget-bytes", "1000"], 1000),
    "db_max_bytes": ("5000", ["--db-max-bytes", "5000"], 5000),
    "retention_seconds": ("60", ["--retention-seconds", "60"], 60.0),
    "retention_interval": ("30", ["--retention-interval", "30"], 30.0),
}  # fmt: skip


def leaf_fields(cls: type, prefix: str = "") -> Iterator[str]:
    """Dotted paths of a settings dataclass's fields, nested settings expanded."""
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for name, f in hints.items():
        nested = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        kind = f.type if isinstance(f.type, type) else None
        if name == "broker":
            yield from leaf_fields(BrokerConnection, f"{prefix}broker.")
        elif nested is not None and dataclasses.is_dataclass(nested):
            yield from leaf_fields(nested, f"{prefix}{name}.")  # type: ignore[arg-type]
        elif kind is not None and dataclasses.is_dataclass(kind):
            yield from leaf_fields(kind, f"{prefix}{name}.")
        else:
            yield prefix + name


def value_at(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for key in list(os.environ):
        if key.startswith("TIDEFLOW_"):
            monkeypatch.delenv(key)
    return monkeypatch


Daemon = tuple[type, Callable[..., Any], Callable[[Any], Any], dict[str, Sample], dict[str, str]]
DAEMONS: dict[str, Daemon] = {
    "operator": (OperatorConfig, operator_cli.build_parser, operator_cli.config_from_args,
                 OPERATOR, {"TIDEFLOW_BROKER": "mqtt://base:1883"}),
    "agent": (AgentConfig, agent_cli.build_parser, agent_cli.config_from_args,
              AGENT, {"TIDEFLOW_SITE": "base-site"}),
}  # fmt: skip


@pytest.mark.parametrize("daemon", sorted(DAEMONS))
def test_every_settings_field_has_a_flag_and_a_variable(
    daemon: str, clean_env: pytest.MonkeyPatch
) -> None:
    cls, build_parser, config_from_args, samples, base_env = DAEMONS[daemon]
    for key, value in base_env.items():
        clean_env.setenv(key, value)
    flags: dict[str, str] = {}
    build_parser(flags)
    paths = sorted(leaf_fields(cls))
    assert paths and set(paths) <= set(samples), f"no sample for {set(paths) - set(samples)}"
    assert set(paths) <= set(flags), f"{daemon} settings without a flag: {set(paths) - set(flags)}"
    default = config_from_args(build_parser().parse_args(["run"]))
    for path in paths:
        text, argv, expected = samples[path]
        assert value_at(default, path) != expected, f"{path}: sample equals the default"
        variable = env_name(flags[path])
        clean_env.setenv(variable, text)
        from_env = config_from_args(build_parser().parse_args(["run"]))
        assert value_at(from_env, path) == expected, f"{variable}={text} did not set {path}"
        clean_env.delenv(variable)
        if variable in base_env:
            clean_env.setenv(variable, base_env[variable])
        from_flag = config_from_args(build_parser().parse_args(["run", *argv]))
        assert value_at(from_flag, path) == expected, f"{argv} did not set {path}"


@pytest.mark.parametrize(
    ("variable", "value", "flag"),
    [
        ("TIDEFLOW_STATUS_MAX_TASKS", "many", "--status-max-tasks"),
        ("TIDEFLOW_HOUSEKEEPING_SECONDS", "0", "--housekeeping-seconds"),
    ],
)
def test_a_bad_variable_is_refused_naming_its_flag(
    variable: str,
    value: str,
    flag: str,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    clean_env.setenv("TIDEFLOW_BROKER", "mqtt://base:1883")
    clean_env.setenv(variable, value)
    with pytest.raises(SystemExit) as exit_info:
        operator_cli.build_parser().parse_args(["run"])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "text"),
    [
        ("--heartbeat-seconds", "0"),
        ("--heartbeat-seconds", "-1"),
        ("--heartbeat-seconds", "nan"),
        ("--heartbeat-seconds", "inf"),
        ("--sync-idle-poll", "0"),
        ("--sync-idle-poll", "nan"),
        ("--retention-seconds", "nan"),
        ("--retention-seconds", "-5"),
        ("--retention-seconds", "inf"),
        ("--retention-interval", "0"),
        ("--retention-interval", "nan"),
        ("--metrics-port", "99999"),
        ("--metrics-port", "-1"),
        ("--sync-batch-count", "10001"),  # over wire.MAX_BATCH_RECORDS: refused for ever
    ],
)
def test_agent_numbers_no_daemon_can_use_are_refused_naming_the_flag(
    flag: str, text: str, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each of these was taken: a heartbeat of 0 or -1 seconds (or nan) published the
    site's state in a busy loop, inf never again; an idle poll of 0 spun the syncer;
    a retention of nan killed the daemon at its first pass (exit 1, a traceback); a
    metrics port past 65535 ended it with OverflowError.  Now each is exit 2 naming
    the flag, as --ack-timeout's are."""
    with pytest.raises(SystemExit) as exit_info:
        agent_cli.build_parser().parse_args(["run", "--site", "s", flag, text])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "text"),
    [
        ("--metrics-port", "70000"),  # ended it with OverflowError
        ("--housekeeping-seconds", "0"),
        ("--housekeeping-seconds", "-1"),
        ("--housekeeping-seconds", "nan"),
        ("--reconcile-seconds", "0"),
        ("--reconcile-seconds", "inf"),
        ("--site-silence-seconds", "0"),
        ("--site-silence-seconds", "nan"),
        ("--site-silence-seconds", "-90"),
    ],
)
def test_operator_numbers_no_daemon_can_use_are_refused_naming_the_flag(
    flag: str, text: str, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each was taken: a metrics port past 65535 ended the operator with
    OverflowError; the periods were any float, so a housekeeping or reconcile
    period of 0 looped without pause (the reconcile one listing Workflows from the
    API server each time), nan or inf never came round again, and a silence limit
    of 0 or below called every site offline while nan never did."""
    clean_env.setenv("TIDEFLOW_BROKER", "mqtt://base:1883")
    with pytest.raises(SystemExit) as exit_info:
        operator_cli.build_parser().parse_args(["run", flag, text])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err
