import json
import os
import socket
import stat
import subprocess
import sys

import h5py
import numpy as np
import pytest

from evpretrain.files import AtomicPath, FolderLock, FolderLockedError, write_atomic, write_text_atomic


def test_write_atomic_writes_the_whole_file_and_nothing_beside_it(tmp_path):
    path = write_atomic(tmp_path / "sub" / "a.bin", lambda file: file.write(b"\x00\x01payload"))
    assert path == tmp_path / "sub" / "a.bin"
    assert path.read_bytes() == b"\x00\x01payload"
    assert [p.name for p in path.parent.iterdir()] == ["a.bin"]
    write_text_atomic(path, "±\n")
    assert path.read_bytes() == "±\n".encode()


def test_a_failed_write_leaves_the_target_untouched_and_no_temporary_file(tmp_path):
    path = write_text_atomic(tmp_path / "a.txt", "before")

    def crash(file):
        file.write(b"half")
        raise RuntimeError("writer crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        write_atomic(path, crash)
    assert path.read_text() == "before"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_path_publishes_a_file_written_by_name_and_discards_it_on_error(tmp_path):
    path = tmp_path / "f.h5"
    with AtomicPath(path) as tmp, h5py.File(tmp, "w") as file:
        assert tmp.parent == tmp_path and tmp.name.startswith(".f.h5.") and tmp.exists()
        assert not path.exists()  # nothing at the target while writing
        file["x"] = np.arange(3)
    with h5py.File(path, "r") as file:
        assert file["x"][:].tolist() == [0, 1, 2]
    with pytest.raises(KeyboardInterrupt):
        with AtomicPath(path) as tmp, h5py.File(tmp, "w") as file:
            file["x"] = np.arange(5)
            raise KeyboardInterrupt
    with h5py.File(path, "r") as file:
        assert file["x"][:].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["f.h5"]


def test_commit_and_discard_by_hand(tmp_path):
    kept, dropped = AtomicPath(tmp_path / "kept.txt"), AtomicPath(tmp_path / "dropped.txt")
    kept.tmp.write_text("done")
    assert kept.commit() == tmp_path / "kept.txt"
    dropped.tmp.write_text("half")
    dropped.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt"]
    assert (tmp_path / "kept.txt").read_text() == "done"


def test_two_writers_of_one_target_get_their_own_temporary_files(tmp_path):
    first, second = AtomicPath(tmp_path / "a.txt"), AtomicPath(tmp_path / "a.txt")
    assert first.tmp != second.tmp
    first.tmp.write_text("first")
    second.tmp.write_text("second")
    second.commit()
    assert (tmp_path / "a.txt").read_text() == "second"
    first.commit()  # the last one to finish wins, whole
    assert (tmp_path / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_files_get_the_permissions_of_any_new_file(tmp_path):
    umask = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_writer_removes_what_dead_writers_on_its_host_left_and_keeps_the_rest(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited
    host = socket.gethostname().replace(".", "_")
    left = tmp_path / f".a.txt.{host}-{dead_pid}.0123456789ab.tmp"
    live = tmp_path / f".a.txt.{host}-{os.getppid()}.0123456789ab.tmp"  # our parent is alive
    remote = tmp_path / f".a.txt.elsewhere-{dead_pid}.0123456789ab.tmp"  # a pid of another host means nothing here
    other = tmp_path / f".b.txt.{host}-{dead_pid}.0123456789ab.tmp"  # another target's
    for path in (left, live, remote, other):
        path.write_text("half")
    write_text_atomic(tmp_path / "a.txt", "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a.txt", live.name, remote.name, other.name])


HOLD = """
import sys, time
from evpretrain.files import FolderLock
lock = FolderLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_folder_lock_refuses_a_second_writer_naming_the_holder_and_is_taken_over_when_it_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderLockedError, match=rf"{tmp_path} is being written .*pid {holder.pid} on "):
            FolderLock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: the holder cannot clean up; the lock file stays
        holder.wait()
    assert (tmp_path / ".lock").exists()
    with FolderLock(tmp_path) as lock:  # a dead holder's lock is taken over
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(FolderLockedError):  # and held, against this process's other attempts too
            FolderLock(tmp_path).acquire()
    FolderLock(tmp_path).acquire().release()
