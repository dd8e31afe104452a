"""Warm starts: a server that imports torch, timm, numba, matplotlib and evpretrain once and forks a child for each
command.

A local pipeline runs about a hundred short ``evpretrain`` jobs, and each cold start spends 5-6 s importing before it
does anything (torch 2 s; timm pulls torchvision, which pulls ``torch._dynamo``, 2.5 s). With a server running, the
``evpretrain`` command forwards its arguments to it and the server forks: the child starts with everything imported
(copy-on-write) and runs the command as the cold process would.

Protocol, over a Unix socket, one connection per command: the client sends a 4-byte big-endian length and a JSON
header ``{"argv", "cwd", "env"}``, its stdin, stdout and stderr passed as descriptors (``SCM_RIGHTS``) with the
first bytes. The server answers with JSON lines: ``{"pid": N}`` once forked, ``{"status": S}`` (a ``waitpid`` status)
when the child has ended.

What a child shares with the server rather than with its client: modules imported at start (so environment variables
read at import, e.g. ``NUMBA_NUM_THREADS``, are the server's; ``OMP_NUM_THREADS`` is applied to torch again) and
Python's hash seed. Everything else is the client's: arguments, working folder, environment, standard streams.

Signals: the client passes SIGINT, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2 on to the child and ends as the child ended
(the same exit code, or killed by the same signal). A child whose client vanishes (SIGKILL) is killed with its
process group, as the cold process would have died with the client. The server
leaves when its parent dies (``PR_SET_PDEATHSIG``), on SIGTERM (ending its children first) and after
``idle_timeout`` seconds with no command running.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import select
import shlex
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["DEFAULT_PRELOAD", "SOCKET_ENV", "run_remote", "serve"]

SOCKET_ENV = "EVPRETRAIN_WARM_START"  # the server's socket; the CLI forwards commands there when it is set
# What the commands import (the CLI imports lazily): the training, downstream and teacher entry points, the readers.
DEFAULT_PRELOAD = (
    "torch",
    "timm",
    "h5py",
    "hdf5plugin",
    "evpretrain.pretrain.run",
    "evpretrain.downstream.run",
    "evpretrain.downstream.robustness",
    "evpretrain.teachers.features",
    "evpretrain.teachers.registry",
    "evpretrain.data.demo",
    "evpretrain.pipeline.tables",
)
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_HEADER = struct.Struct(">I")


def serve(socket_path: str | Path, *, idle_timeout: float = 300.0, preload: Sequence[str] = DEFAULT_PRELOAD) -> None:
    """Listen on ``socket_path`` and run each command a client sends in a forked child; return when idle for
    ``idle_timeout`` seconds, on SIGTERM, or when the parent process dies. The socket is bound before the imports,
    so that a command sent meanwhile waits in the backlog instead of starting cold."""
    # Imported here, not at the top: every evpretrain command imports this module for SOCKET_ENV and run_remote.
    from evpretrain.plotting import pyplot
    from evpretrain.workers import signal_on_parent_death

    socket_path = Path(socket_path)
    if not signal_on_parent_death(os.getppid(), signal.SIGTERM):
        return
    listener = _listen(socket_path)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:
        for name in preload:
            importlib.import_module(name)
        pyplot()  # matplotlib on Agg, for the commands that draw figures
        children: dict[int, socket.socket] = {}
        orphaned: set[socket.socket] = set()
        last_active = time.monotonic()
        while not stopping:
            readable, _, _ = select.select([listener, *children.values()], [], [], 0.2)
            for ready in readable:
                if ready is listener:
                    connection, _ = listener.accept()
                    pid = _start(connection, listener, children) if _same_user(connection) else None
                    if pid is not None:
                        children[pid] = connection
                elif ready not in orphaned:  # a client hung up while its child runs: it was SIGKILLed
                    orphaned.add(ready)
                    pid = next(p for p, c in children.items() if c is ready)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)  # as its cold process would have been
            _reap(children)
            orphaned &= set(children.values())
            if children or readable:
                last_active = time.monotonic()
            elif time.monotonic() - last_active > idle_timeout:
                break
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
        while children:
            _reap(children)
            time.sleep(0.05)
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()


def run_remote(socket_path: str | Path, argv: Sequence[str]) -> int | None:
    """Run ``evpretrain argv`` in the server at ``socket_path`` with this process's folder, environment and
    standard streams; return its exit code, or None when no server answers there (the caller then runs it here).
    A signal the child dies of is raised again in this process."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(str(socket_path))
    except OSError:
        client.close()
        return None
    with client:
        header = json.dumps({"argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        message = _HEADER.pack(len(header)) + header
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sent = socket.send_fds(client, [message], [0, 1, 2])
        client.sendall(message[sent:])
        replies = client.makefile("r")
        started = replies.readline()
        if not started:
            return None  # the server ended before forking: nothing ran
        pid = json.loads(started)["pid"]
        previous = {sig: signal.signal(sig, lambda sig, _: _forward(pid, sig)) for sig in FORWARDED_SIGNALS}
        try:
            ended = replies.readline()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if not ended:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        print(f"evpretrain: the warm-start server at {socket_path} ended while running pid {pid}", file=sys.stderr)
        return 1
    status = json.loads(ended)["status"]
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    return os.waitstatus_to_exitcode(status)


def _listen(socket_path: Path) -> socket.socket:
    """A listening socket at ``socket_path``; a stale socket file (nothing listening) is replaced."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(socket_path))
    except FileNotFoundError:
        pass
    except ConnectionRefusedError:
        socket_path.unlink()
    else:
        raise FileExistsError(f"{socket_path}: another warm-start server listens there")
    finally:
        probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_path))
    os.chmod(socket_path, 0o600)  # a command runs as this user: nobody else may send one
    listener.listen(64)
    return listener


def _same_user(connection: socket.socket) -> bool:
    """Whether the peer runs as this process's user (``SO_PEERCRED``); a connection from anyone else is closed."""
    _, uid, _ = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    if uid != os.getuid():
        connection.close()
        return False
    return True


def _start(connection: socket.socket, listener: socket.socket, children: dict[int, socket.socket]) -> int | None:
    """Read one command from ``connection`` and fork its child; the child never returns. None if the client sent
    no complete request."""
    try:
        data, fds, _, _ = socket.recv_fds(connection, 1 << 16, 3)
        if len(data) < _HEADER.size or len(fds) != 3:
            raise ValueError("incomplete request")
        (size,) = _HEADER.unpack_from(data)
        while len(data) < _HEADER.size + size:
            chunk = connection.recv(1 << 16)
            if not chunk:
                raise ValueError("incomplete request")
            data += chunk
        request = json.loads(data[_HEADER.size : _HEADER.size + size])
    except (OSError, ValueError):
        connection.close()
        return None
    pid = os.fork()
    if pid == 0:
        _child(request, fds, [listener, *children.values()])
    for fd in fds:
        os.close(fd)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} pid {pid}: evpretrain {shlex.join(request['argv'])}", flush=True)
    connection.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    return pid


def _child(request: dict, fds: list[int], inherited: list[socket.socket]) -> None:
    """The forked child: become the client's process (streams, folder, environment, signals) and run the command."""
    code = 1
    try:
        for sock in inherited:
            sock.close()
        os.setsid()  # its own process group: the server's killpg reaches the command's DataLoader workers too
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own streams, never closed
        sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.pop(SOCKET_ENV, None)  # a command the child starts runs cold, not through this server
        sys.argv = ["evpretrain", *request["argv"]]
        if "OMP_NUM_THREADS" in os.environ and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        import logging

        logging.getLogger("evpretrain").handlers.clear()  # main() chooses them for this process's stderr
        from evpretrain.cli import main

        try:
            code = main(request["argv"])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if not isinstance(exit_.code, int | None):
                print(exit_.code, file=sys.stderr)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001 - report whatever ended the command, as a cold start would
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code or 0)


def _reap(children: dict[int, socket.socket]) -> None:
    """Send each ended child's wait status to its client and close the connection."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        connection = children.pop(pid, None)
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} pid {pid}: ended, wait status {status}", flush=True)
        if connection is not None:
            with contextlib.suppress(OSError):
                connection.sendall(json.dumps({"status": status}).encode() + b"\n")
            connection.close()


def _forward(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
