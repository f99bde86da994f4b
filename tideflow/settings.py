"""Daemon settings from the command line and ``TIDEFLOW_*`` variables, written once.

Both daemons (``tideflow-operator run``, ``tideflow-agent run``) take one
settings object each (:class:`tideflow_operator.runtime.OperatorConfig`,
:class:`edge_agent.daemon.AgentConfig`, like kopf's ``OperatorSettings`` or
DBOS's ``DBOSConfig``), and every field of it can be set both by a flag and
by an environment variable: the flag ``--status-max-tasks`` reads
``TIDEFLOW_STATUS_MAX_TASKS`` (:func:`env_name`).  A flag given wins over the
variable; the variable over the default.  Charts set the variables.

:class:`EnvOptions` adds such options to an argparse parser and remembers
which flag each settings field comes from (``fields``), so a test can hold
every field of a settings object to having a flag and a variable.  A
variable's value is checked by the option's ``type`` exactly as the flag's
would be (argparse converts a string default), so a bad value exits with
the flag's name in the message.

The broker connection — URL, user, password file, TLS CA — is one
:class:`~tideflow.mqtt.BrokerConnection`, with the same four options on both
sides (:meth:`EnvOptions.broker`).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tideflow.mqtt import BrokerConnection
from tideflow.wire import MAX_BATCH_RECORDS

ENV_PREFIX = "TIDEFLOW_"
_TRUE = ("1", "true", "yes", "on")


def env_name(flag: str) -> str:
    """``--status-max-tasks`` -> ``TIDEFLOW_STATUS_MAX_TASKS``."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def env(name: str, fallback: str | None = None) -> str | None:
    """The value of ``TIDEFLOW_<name>``, or ``fallback`` (unset or empty)."""
    return os.environ.get(ENV_PREFIX + name) or fallback


def env_flag(name: str, default: bool) -> bool:
    """``TIDEFLOW_<name>`` as a yes/no (1, true, yes, on), or ``default`` when unset."""
    value = env(name)
    return default if value is None else value.lower() in _TRUE


class EnvOptions:
    """Adds options whose defaults come from ``TIDEFLOW_*`` to ``parser``.

    ``field`` names the settings field an option sets (dotted for nested
    settings, ``sync.ack_timeout``); :attr:`fields` maps each to its flag.
    """

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser
        self.fields: dict[str, str] = {}

    def _note(self, field: str | None, flag: str) -> None:
        if field is not None:
            self.fields[field] = flag

    def option(
        self,
        flag: str,
        *aliases: str,
        field: str | None = None,
        type: Callable[[str], Any] = str,
        default: Any = None,
        required: bool = False,
        help: str | None = None,
        **kwargs: Any,
    ) -> argparse.Action:
        """A valued option; ``required`` only while neither the flag nor its variable is set."""
        name = env_name(flag)
        value = os.environ.get(name) or None  # an empty variable is an unset one
        self._note(field, flag)
        text = f"{help + ' ' if help else ''}(env {name})"
        return self.parser.add_argument(
            flag,
            *aliases,
            type=type,
            default=default if value is None else value,
            required=required and value is None,
            help=text,
            **kwargs,
        )

    def switch(
        self,
        flag: str,
        *,
        field: str | None = None,
        default: bool = False,
        negatable: bool = False,
        help: str | None = None,
    ) -> argparse.Action:
        """A yes/no option ``--x`` (``--no-x`` too if ``negatable``); variable: 1/true/yes/on."""
        name = env_name(flag)
        self._note(field, flag)
        return self.parser.add_argument(
            flag,
            action=argparse.BooleanOptionalAction if negatable else "store_true",
            default=env_flag(name[len(ENV_PREFIX) :], default),
            help=f"{help + ' ' if help else ''}(env {name})",
        )

    def broker(self, *, default: str | None = None, prefix: str = "broker") -> None:
        """``--broker``, ``--username``, ``--password-file``, ``--tls-ca``: one BrokerConnection."""
        self.option(
            "--broker",
            field=f"{prefix}.url",
            default=default,
            required=default is None,
            help="MQTT broker URL (mqtt://host:1883, mqtts://host:8883), or the nodes of a "
            "clustered broker comma-separated (failover)",
        )
        # (paho encodes it: other bytes raised UnicodeEncodeError as the link was made)
        self.option("--username", field=f"{prefix}.username", type=utf8_text, help="MQTT user")
        self.option(
            "--password-file",
            field=f"{prefix}.password_file",
            type=Path,
            help="file holding the MQTT password (read at connect, never logged)",
        )
        self.option(
            "--tls-ca", field=f"{prefix}.tls_ca", type=Path, help="CA certificate for mqtts://"
        )


def broker_from_args(args: argparse.Namespace) -> BrokerConnection:
    """The connection :meth:`EnvOptions.broker`'s options describe."""
    return BrokerConnection(
        url=args.broker,
        username=args.username,
        password_file=args.password_file,
        tls_ca=args.tls_ca,
    )


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse turns the error into exit 2)."""
    if (value := _whole(text)) < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def records_per_batch(text: str) -> int:
    """argparse type: records in one events message, 1 to wire.MAX_BATCH_RECORDS (the
    cloud refuses a bigger batch, and the agent would send it again for ever)."""
    if not 1 <= (value := _whole(text)) <= MAX_BATCH_RECORDS:
        raise argparse.ArgumentTypeError(f"{value} is not from 1 to {MAX_BATCH_RECORDS}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds")
    return value


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0 (argparse turns the error into exit 2)."""
    if (value := _seconds(text)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds above 0")
    return value


def seconds_at_least_zero(text: str) -> float:
    """argparse type: a finite number of seconds >= 0 (a retention of 0 deletes at once)."""
    if (value := _seconds(text)) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds, 0 or more")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1-65535 (past it, binding raised OverflowError)."""
    if not 1 <= (value := _whole(text)) <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1-65535)")
    return value


#: SQLite's largest integer: a bigger number as a query's parameter raised OverflowError.
_SQLITE_MAX_INT = 2**63 - 1


def attempt_number(text: str) -> int:
    """argparse type: a task's attempt, counted from 1 (at most SQLite's largest integer)."""
    if not 1 <= (value := _whole(text)) <= _SQLITE_MAX_INT:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an attempt number (1, 2, ...)")
    return value


def file_path(text: str) -> str:
    """argparse type: a file's path, not empty (``--db ""``, a variable that expanded
    to nothing, was the current directory's ``Path('.')``: a ValueError traceback)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    return text


#: The levels ``--log-level`` takes (any case), as :mod:`logging` names them.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(text: str) -> str:
    """argparse type: a level :mod:`logging` knows by name (another ended in a
    ValueError traceback when the logging was configured)."""
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"{text.encode('utf-8', 'surrogateescape')[:40]!r} is not a log level "
            f"({', '.join(LOG_LEVELS)})"
        )
    return text.upper()


def utf8_text(text: str) -> str:
    """argparse type: text that is UTF-8 (a name given in other bytes matches nothing stored,
    and binding it to a query raised UnicodeEncodeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(
            f"{text.encode('utf-8', 'surrogateescape')[:60]!r} is not UTF-8 text"
        ) from None
    return text


__all__ = [
    "ENV_PREFIX",
    "LOG_LEVELS",
    "EnvOptions",
    "attempt_number",
    "broker_from_args",
    "env",
    "env_flag",
    "env_name",
    "file_path",
    "log_level",
    "port_number",
    "positive_int",
    "positive_seconds",
    "records_per_batch",
    "seconds_at_least_zero",
    "utf8_text",
]
