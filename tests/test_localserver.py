"""The CLI's local server: started on demand, reused, stopped; as root and as a normal user."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sessiontag.embedded import LocalServer


def run(home, *args, user: pwd.struct_passwd | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["SESSIONTAG_HOME"] = str(home)
    argv = [sys.executable, "-m", "sessiontag.cli", *args]
    if user is not None:
        env["HOME"] = str(home)
        argv = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=180)


@pytest.fixture
def home():
    # Not under pytest's tmp_path: as root that is private to root, and the server user
    # must be able to enter the home (see test_a_home_the_server_user_cannot_enter...).
    base = Path(tempfile.mkdtemp(prefix="sessiontag-test-"))
    base.chmod(0o755)
    path = base / "home"
    yield path
    if (path / "data" / "PG_VERSION").exists():
        LocalServer(path).stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the server to another user")
def test_a_home_the_server_user_cannot_enter_is_a_clear_error(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    result = run(private / "home", "db", "start")
    assert result.returncode == 1
    assert result.stderr.startswith("error: PostgreSQL runs as ") and "cannot enter" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_commands_start_the_local_server_on_demand_and_reuse_it(home):
    status = run(home, "db", "status")
    assert status.returncode == 3 and "not initialized" in status.stdout
    # three commands at once on a fresh home: one initializes and starts, all succeed
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: run(home, "migrations", "--format", "csv"), range(3)))
    for r in results:
        assert r.returncode == 0, r.stderr
    notices = [r.stderr for r in results if "started the local server" in r.stderr]
    assert len(notices) == 1 and str(home / "data") in notices[0], "the one that started it says so"
    applied = run(home, "migrate")
    assert applied.returncode == 0 and "applied 0001_base_tables" in applied.stdout
    status = run(home, "db", "status")
    assert status.returncode == 0 and status.stdout.startswith("running (pid ")
    assert run(home, "db", "url").stdout.strip() == LocalServer(home).dsn()
    assert run(home, "db", "start").stdout.startswith("already running")
    assert run(home, "db", "stop").stdout.strip() == "stopped"
    assert run(home, "db", "status").returncode == 3
    # the data survives a restart, and `verify` brings the server back up by itself
    verify = run(home, "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stderr.startswith("started the local server")


def test_a_home_that_is_not_a_directory_is_a_clear_error(home):
    home.parent.mkdir(parents=True, exist_ok=True)
    home.write_text("not a directory")
    result = run(home, "sessions", "list")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: cannot use {home} for the local server (SESSIONTAG_HOME): File exists"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_local_server_works_for_a_normal_user(home):
    user = pwd.getpwnam("nobody")
    home.mkdir()
    os.chown(home, user.pw_uid, user.pw_gid)
    probe = subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
                            sys.executable, "-c", "import sessiontag"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("the virtualenv is not readable by an unprivileged user here")
    try:
        started = run(home, "db", "start", user=user)
        assert started.returncode == 0, started.stderr
        assert run(home, "migrate", user=user).returncode == 0
        assert os.stat(home / "data").st_uid == user.pw_uid
    finally:
        run(home, "db", "stop", user=user)
        shutil.rmtree(home / "data", ignore_errors=True)  # keep the fixture from stopping it as root


def test_a_home_too_long_for_the_unix_socket_is_a_clear_error(home):
    long_home = home / ("x" * 100)
    result = run(long_home, "db", "start")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"error: SESSIONTAG_HOME {long_home} is too long: the local server's Unix socket")
    assert "the limit is 107" in result.stderr
    assert not (long_home / "data").exists(), "refused before initializing anything"


def test_a_server_that_fails_to_start_says_why_from_its_log(home):
    assert run(home, "db", "start").returncode == 0
    assert run(home, "db", "stop").returncode == 0
    with open(home / "data" / "postgresql.auto.conf", "a") as conf:
        conf.write("max_connections = 'many'\n")
    result = run(home, "db", "start")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: starting the local server failed: configuration file ")
    assert "contains errors" in result.stderr and "Examine the log output" not in result.stderr
