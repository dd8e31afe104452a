"""The warm-start server: a command forked from it behaves as the same command started cold."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evpretrain.warm_start import SOCKET_ENV, run_remote

EVPRETRAIN = Path(sys.executable).with_name("evpretrain")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A running server's socket path; its log (one line per command forked and ended) beside it."""
    folder = tmp_path_factory.mktemp("warm")
    socket_path = folder / "socket"
    log = open(folder / "server.log", "w")  # noqa: SIM115 - closed with the server
    process = subprocess.Popen(
        [str(EVPRETRAIN), "warm-start", "--socket", str(socket_path), "--idle-timeout", "120"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while not socket_path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield socket_path
    process.terminate()
    assert process.wait(timeout=30) == 0
    log.close()
    assert not socket_path.exists()


def client(socket_path, *args, cwd, env_extra=None, **popen):
    """``evpretrain args`` sent to the server at ``socket_path`` from ``cwd``, with this environment and
    ``env_extra``."""
    env = {**os.environ, SOCKET_ENV: str(socket_path), **(env_extra or {})}
    return subprocess.Popen([str(EVPRETRAIN), *args], cwd=cwd, env=env, **popen)


def server_log(socket_path) -> str:
    return (socket_path.parent / "server.log").read_text()


def test_a_command_runs_forked_with_the_clients_folder_streams_and_exit_code(server, tmp_path):
    (tmp_path / "not-events.txt").write_text("hello")
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        run = client(server, "data", "info", "not-events.txt", cwd=tmp_path, stdout=out, stderr=err)
        assert run.wait(timeout=120) == 2
    assert "evpretrain: error:" in (tmp_path / "err").read_text()
    assert "not-events.txt" in (tmp_path / "err").read_text()  # the relative path, resolved in the client's folder
    assert "evpretrain data info not-events.txt" in server_log(server)

    listed = client(server, "data", "formats", cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    assert (
        listed.communicate(timeout=120)[0]
        == subprocess.run(
            [str(EVPRETRAIN), "data", "formats"], capture_output=True, text=True, env={**os.environ, SOCKET_ENV: ""}
        ).stdout
    )


def test_the_child_takes_the_clients_environment(server, tmp_path):
    # build-demo takes its default worker count from SLURM_CPUS_PER_TASK, read when the command runs
    config = tmp_path / "study.yaml"
    config.write_text("data:\n  demo:\n    samples: {train: 2, val: 0, test: 0}\n")
    command = ("data", "build-demo", "--config", str(config), "--quiet")
    bad = client(
        server,
        *command,
        "--out",
        "bad",
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env_extra={"SLURM_CPUS_PER_TASK": "not-a-number"},
    )
    assert bad.wait(timeout=120) == 1
    assert "'not-a-number'" in bad.stderr.read()
    good = client(server, *command, "--out", "good", cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    assert good.wait(timeout=120) == 0
    assert (tmp_path / "good" / "train.h5").is_file()


def test_a_signal_to_the_client_reaches_the_command_and_a_killed_client_takes_it_along(server, tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text("data:\n  demo:\n    samples: {train: 100000}\n")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        out = tmp_path / f"demo-{sig.name}"
        run = client(
            server,
            "data",
            "build-demo",
            "--config",
            str(config),
            "--out",
            str(out),
            "--workers",
            "1",
            "--quiet",
            cwd=tmp_path,
        )
        deadline = time.monotonic() + 120
        while f"--out {out} --workers 1" not in server_log(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = int(server_log(server).split(f"--out {out}")[0].rsplit("pid ", 1)[1].split(":")[0])
        time.sleep(1.0)
        run.send_signal(sig)
        assert run.wait(timeout=60) == -sig  # the client ends as the command did (SIGKILL: as itself)
        deadline = time.monotonic() + 30
        while f"pid {pid}: ended" not in server_log(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        ended = server_log(server).split(f"pid {pid}: ended, wait status ")[1].split("\n")[0]
        assert os.WTERMSIG(int(ended)) == sig  # SIGTERM forwarded; SIGKILL of the client: the server kills it
        assert not list(out.glob("*.h5"))  # nothing half-written


def test_without_a_server_the_command_runs_here(tmp_path):
    assert run_remote(tmp_path / "no-socket", ["data", "formats"]) is None
    run = subprocess.run(
        [str(EVPRETRAIN), "data", "formats"],
        capture_output=True,
        text=True,
        env={**os.environ, SOCKET_ENV: str(tmp_path / "no-socket")},
    )
    assert run.returncode == 0 and "dat" in run.stdout
