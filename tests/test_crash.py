"""Crash safety: kill -9 the server under 8 writers; nothing acknowledged is lost and
numbering continues gaplessly after restart."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from sessiontag import migrate
from tests.pgcluster import Postgresql


def _children_of(pid: int) -> list[int]:
    """The processes whose parent is pid (the postmaster's backends and workers)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ")"
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
    return children


def _wait_for_exit(pids: list[int], timeout: float = 60) -> None:
    """After the postmaster dies, its backends notice and exit; wait for the last one,
    since a new postmaster will not start while they hold the old shared memory."""
    def alive(pid: int) -> bool:
        try:  # a zombie has exited; only its parent's wait() is missing
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(pid) for pid in pids):
            return
        time.sleep(0.2)
    raise AssertionError(f"PostgreSQL processes {pids} did not exit")


@pytest.mark.slow
def test_kill_9_under_8_writers_loses_no_acknowledged_write():
    server = Postgresql(durable=True)  # fsync and synchronous_commit on, as in production
    try:
        dsn = server.libpq_dsn("test")
        migrate.apply(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            model = conn.execute("SELECT sessiontag.register_model('GPT-4o', 'openai', 'gpt-4o')").fetchone()[0]
        hot_user = uuid.uuid4()
        acknowledged: list[tuple] = []
        lock = threading.Lock()
        ready = threading.Barrier(9)

        def writer(i: int) -> None:
            own_user = uuid.uuid4()
            try:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    ready.wait()
                    n = 0
                    while True:
                        user = hot_user if n % 2 else own_user
                        conv, tag, counter = conn.execute(
                            "SELECT id, session_id, session_counter FROM sessiontag.create_conversation(%s, %s)",
                            [user, model]).fetchone()
                        conn.execute("SELECT sessiontag.record_trace(%s, %s, 'root', 'chat', conversation_id => %s)",
                                     [user, f"w{i}-{n}", conv])
                        with lock:
                            acknowledged.append((user, conv, tag, counter, f"w{i}-{n}"))
                        n += 1
            except psycopg.Error:
                return  # the server went away under us: expected

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        ready.wait()
        while len(acknowledged) < 400:
            time.sleep(0.05)
        postmaster = server.child_process.pid
        server_processes = [postmaster, *_children_of(postmaster)]
        os.kill(postmaster, signal.SIGKILL)
        server.child_process.wait()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        _wait_for_exit(server_processes)

        server.child_process = None
        server.start()  # crash recovery replays the WAL
        with psycopg.connect(dsn) as conn:
            convs = {r[0]: r[1:] for r in conn.execute(
                "SELECT id, user_id, session_id, session_counter FROM sessiontag.conversations")}
            traces = {r[0]: r[1] for r in conn.execute("SELECT trace_id, session_tag FROM sessiontag.llm_traces")}
            for user, conv, tag, counter, trace in acknowledged:
                assert convs.get(conv) == (user, tag, counter), "an acknowledged conversation was lost"
                assert traces.get(trace) == tag, "an acknowledged trace was lost or lost its tag"
            per_user: dict = {}
            for user, tag, counter in convs.values():
                per_user.setdefault(user, []).append(counter)
            for user, numbers in per_user.items():
                assert sorted(numbers) == list(range(1, len(numbers) + 1)), "numbers stay gapless"
            nxt = conn.execute("SELECT session_counter FROM sessiontag.create_conversation(%s, %s)",
                               [hot_user, model]).fetchone()[0]
            assert nxt == len(per_user[hot_user]) + 1
    finally:
        server.stop()
