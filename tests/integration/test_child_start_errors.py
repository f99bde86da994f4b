"""A task that cannot start fails as ``subprocess.Popen`` would say it (issue 15).

``edge_agent.child`` starts processes with the call ``Popen`` itself makes
(``_posixsubprocess.fork_exec``) without ``Popen``'s Python around it.  What
the runner tells a site about a start that failed comes from the exception:
its type (not found, permission denied: permanent; out of processes: retried),
``errno``, ``strerror`` and ``filename`` (the executable, or the working
directory when ``chdir`` failed).  Proves, with real processes, that for every
way a start fails here (a missing program, by path or searched in the task's
own ``PATH``; a file without the execute bit; a script without ``#!``; a
directory; a missing or non-directory working directory; a NUL byte in an
argument or a value; ``=`` in a name; a ``preexec_fn`` that raises) the
exception equals ``Popen``'s for the same arguments, nothing is left open and
no child is left unreaped; and that the started process gets exactly its
arguments, environment, working directory, stdin from ``/dev/null`` and a
session of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_agent.child import Child

Case = tuple[list[str], str, dict[str, str], Callable[[], None] | None]


def _raise() -> None:
    raise RuntimeError("cannot join")


def _cases(tmp: Path) -> dict[str, Case]:
    no_exec_bit = tmp / "no-exec-bit"
    no_exec_bit.write_text("#!/bin/sh\necho hi\n")
    no_shebang = tmp / "no-shebang"
    no_shebang.write_text("echo hi\n")
    no_shebang.chmod(0o755)
    a_file = tmp / "a-file"
    a_file.write_text("")
    here = str(tmp)
    path = {"PATH": "/usr/bin:/bin"}
    return {
        "missing by path": (["/nonexistent/tool", "x"], here, path, None),
        "missing in PATH": (["no-such-tool-here"], here, path, None),
        "missing, no PATH": (["no-such-tool-here"], here, {}, None),
        "no execute bit": ([str(no_exec_bit)], here, {}, None),
        "script without #!": ([str(no_shebang)], here, {}, None),
        "relative script without #!": (["./no-shebang"], here, {}, None),
        "found in PATH, no #!": (["no-shebang"], here, {"PATH": f"/nonexistent:{here}"}, None),
        "a directory": ([here], here, {}, None),
        "missing working directory": (["true"], f"{here}/nope", path, None),
        "working directory is a file": (["true"], str(a_file), path, None),
        "NUL in an argument": (["true", "a\0b"], here, path, None),
        "NUL in a value": (["true"], here, {**path, "X": "a\0b"}, None),
        "= in a name": (["true"], here, {**path, "X=Y": "1"}, None),
        "preexec_fn raises": (["true"], here, path, _raise),
    }


def _described(exc: BaseException) -> tuple[object, ...]:
    return (
        type(exc),
        getattr(exc, "errno", None),
        getattr(exc, "strerror", None),
        getattr(exc, "filename", None),
        str(exc),
    )


def _popens(case: Case) -> tuple[object, ...]:
    argv, cwd, env, preexec_fn = case
    try:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            start_new_session=True,
            preexec_fn=preexec_fn,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except Exception as exc:
        return _described(exc)
    process.wait()
    return ("started",)


async def _one_start() -> None:
    child = Child.spawn(["true"], "/", {"PATH": "/usr/bin:/bin"})
    await asyncio.wait_for(child.exited(), 30)
    await asyncio.wait_for(child.drained(), 30)
    child.close()


def _descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _zombies() -> list[str]:
    mine = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == mine and fields[0] == "Z":
                found.append(entry)
    return found


@pytest.mark.parametrize(
    "name",
    [
        "missing by path",
        "missing in PATH",
        "missing, no PATH",
        "no execute bit",
        "script without #!",
        "relative script without #!",
        "found in PATH, no #!",
        "a directory",
        "missing working directory",
        "working directory is a file",
        "NUL in an argument",
        "NUL in a value",
        "= in a name",
        "preexec_fn raises",
    ],
)
async def test_a_start_that_fails_raises_what_popen_raises(tmp_path: Path, name: str) -> None:
    case = _cases(tmp_path)[name]
    expected = _popens(case)
    assert expected != ("started",), f"{name}: Popen started it"
    argv, cwd, env, preexec_fn = case
    await _one_start()  # (what is opened once per process is open now)
    before = _descriptors()
    with pytest.raises(BaseException) as caught:
        Child.spawn(argv, cwd, env, preexec_fn)
    assert _described(caught.value) == expected
    assert _descriptors() == before, "a descriptor was left open"
    assert _zombies() == [], "a child that could not start was left unreaped"


async def test_the_process_gets_its_arguments_environment_directory_and_session(
    tmp_path: Path,
) -> None:
    script = (
        "import os, sys, json; print(json.dumps([sys.argv[1:], dict(os.environ), os.getcwd(),"
        " os.getsid(0) == os.getpid(), os.getpgrp() == os.getpid(), sys.stdin.read(),"
        " sorted(int(fd) for fd in os.listdir('/proc/self/fd'))]))"
    )
    env = {"PATH": "/usr/bin:/bin", "A": "1", "EMPTY": "", "UTF": "é"}
    child = Child.spawn([sys.executable, "-c", script, "x", "y z"], str(tmp_path), env)
    try:
        code = await asyncio.wait_for(child.exited(), 30)
        await asyncio.wait_for(child.drained(), 30)
    finally:
        child.close()
    assert code == 0, child.stderr.value()
    argv, seen_env, cwd, leads_session, leads_group, stdin, fds = json.loads(child.stdout.value())
    assert argv == ["x", "y z"]
    assert {k: v for k, v in seen_env.items() if k in env} == env
    assert cwd == str(tmp_path)
    assert leads_session and leads_group
    assert stdin == ""
    assert fds[:3] == [0, 1, 2] and len(fds) <= 4  # (the listing's own descriptor)


async def test_exit_codes_and_signals_are_reported_as_popen_reports_them() -> None:
    codes = []
    for argv in (["true"], ["false"], ["sh", "-c", "exit 7"], ["sh", "-c", "kill -TERM $$"]):
        child = Child.spawn(argv, "/", {"PATH": "/usr/bin:/bin"})
        codes.append(await asyncio.wait_for(child.exited(), 30))
        await asyncio.wait_for(child.drained(), 30)
        child.close()
        assert child.returncode == codes[-1]
    assert codes == [0, 1, 7, -15]
