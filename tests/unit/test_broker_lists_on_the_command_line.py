"""``--broker`` takes a failover list on both sides; a list that cannot work is refused up front.

The agent and the operator exit 2 naming ``--broker`` before they open a
database or touch Kubernetes, for a list with an empty entry or one that
mixes ``mqtt://`` and ``mqtts://`` (the link sets TLS up once for all nodes).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent import cli as agent_cli
from tideflow.mqtt import BrokerConnection
from tideflow_operator import cli as operator_cli


@pytest.mark.parametrize(
    ("brokers", "why"),
    [
        ("mqtt://a:1,mqtts://b:2", "mixes mqtt:// and mqtts://"),
        ("mqtt://a:1,,mqtt://b:2", "empty entry"),
    ],
)
def test_a_broker_list_that_cannot_work_is_refused_naming_the_flag(
    brokers: str, why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "site.db"
    code = agent_cli.main(["run", "--site", "s-1", "--broker", brokers, "--db", str(db)])
    err = capsys.readouterr().err
    assert code == 2 and "--broker" in err and why in err
    assert not db.exists(), "nothing is opened before the flags are checked"
    assert operator_cli.main(["run", "--broker", brokers, "--no-leader-election"]) == 2
    err = capsys.readouterr().err
    assert "--broker" in err and why in err


@pytest.mark.parametrize(
    "brokers",
    [
        "mqtt://op:s3cret@127.0.0.1:1883",  # (taken, and the password silently not used)
        "http://op:s3cret@127.0.0.1",
        "mqtt://op:s3cret@127.0.0.1:1,mqtts://b:2",
        "mqtt://a:1,mqtt://op:s3cret@b:2",
    ],
)
def test_credentials_in_a_broker_url_are_refused_and_never_echoed(
    brokers: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A password in ``--broker`` was dropped without a word (the broker then refused
    the connection as anonymous, for ever) and echoed whole in the errors about the
    URL: the password goes in a file (``--password-file``), never in an argument."""
    assert operator_cli.main(["run", "--broker", brokers, "--no-leader-election"]) == 2
    err = capsys.readouterr().err
    assert "--broker" in err and "s3cret" not in err, err
    db = tmp_path / "site.db"
    assert agent_cli.main(["run", "--site", "s-1", "--broker", brokers, "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert "--broker" in err and "s3cret" not in err, err


def test_the_operator_speaks_mqtt_3_1_1_when_asked() -> None:
    parser = operator_cli.build_parser()
    assert parser.parse_args(["run", "--broker", "mqtt://a"]).mqtt_version == "5"
    args = parser.parse_args(["run", "--broker", "mqtt://a,mqtt://b", "--mqtt-version", "3.1.1"])
    assert args.mqtt_version == "3.1.1"
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--broker", "mqtt://a", "--mqtt-version", "4"])


def test_the_operators_silence_limit_for_sites_reaches_the_bridge() -> None:
    from tideflow_operator.runtime import OperatorConfig

    parser = operator_cli.build_parser()
    assert parser.parse_args(["run", "--broker", "mqtt://a"]).site_silence_seconds == 90
    args = parser.parse_args(["run", "--broker", "mqtt://a", "--site-silence-seconds", "45"])
    config = OperatorConfig(
        broker=BrokerConnection("mqtt://a"), site_silence_seconds=args.site_silence_seconds
    )
    assert config.bridge_config().site_silence_seconds == 45
    assert (
        OperatorConfig(broker=BrokerConnection("mqtt://a"), mqtt5=False).bridge_config().mqtt5
        is False
    )
