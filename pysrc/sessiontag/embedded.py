"""PostgreSQL on this machine: the CLI's local server and the test clusters.

PostgreSQL refuses to run as root. When we are root, every server program runs as an
unprivileged user (``postgres`` when it exists, else ``nobody``; ``SESSIONTAG_PG_USER``
overrides) through ``setpriv``, which keeps the process id, so the caller can still
wait for and signal the server it started.
"""

from __future__ import annotations

import fcntl
import glob
import grp
import os
import pwd
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .errors import SessiontagError

DATABASE = "sessiontag"
SUPERUSER = "postgres"


def bindir() -> Path:
    """Directory of the PostgreSQL server programs (initdb, pg_ctl, postgres)."""
    configured = os.environ.get("SESSIONTAG_PG_BINDIR")
    if configured:
        return Path(configured)
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        candidate = Path(out.stdout.strip())
        if (candidate / "initdb").exists() and (candidate / "postgres").exists():
            return candidate
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(candidate, "postgres")):
            return Path(candidate)
    raise SessiontagError(
        "PostgreSQL server programs not found: install PostgreSQL 15 "
        "(apt-get install postgresql-15) or set SESSIONTAG_PG_BINDIR"
    )


def server_user() -> pwd.struct_passwd | None:
    """The account the server runs as when we are root; None when we are not."""
    if os.geteuid() != 0:
        return None
    names = [os.environ["SESSIONTAG_PG_USER"]] if os.environ.get("SESSIONTAG_PG_USER") else ["postgres", "nobody"]
    for name in names:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise SessiontagError(f"running as root and no unprivileged user to run PostgreSQL as (tried {', '.join(names)})")


def pg_argv(program: str, *args: str) -> list[str]:
    """Command line that runs a PostgreSQL program, as the server user when root."""
    path = str(bindir() / program)
    user = server_user()
    if user is None:
        return [path, *args]
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", path, *args]


def hand_over(path: Path | str) -> None:
    """Give a directory tree to the server user (no-op unless root)."""
    user = server_user()
    if user is None:
        return
    os.chown(path, user.pw_uid, user.pw_gid)
    for root, dirs, files in os.walk(path):
        os.chown(root, user.pw_uid, user.pw_gid)
        for name in files:
            os.chown(os.path.join(root, name), user.pw_uid, user.pw_gid, follow_symlinks=False)


def _unreachable_parent(user: pwd.struct_passwd, path: Path) -> Path | None:
    """The first existing parent directory of ``path`` that ``user`` cannot enter."""
    groups = {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem} | {user.pw_gid}
    for parent in reversed(path.absolute().parents):
        if not parent.exists():
            break
        st = parent.stat()
        if st.st_uid == user.pw_uid:
            allowed = st.st_mode & 0o100
        elif st.st_gid in groups:
            allowed = st.st_mode & 0o010
        else:
            allowed = st.st_mode & 0o001
        if not allowed:
            return parent
    return None


def default_home() -> Path:
    """Where the local server keeps its cluster: SESSIONTAG_HOME, else a per-user data dir.

    Root's home is private to root, so as root the cluster lives in /var/lib/sessiontag,
    where the unprivileged server user can reach it.
    """
    if os.environ.get("SESSIONTAG_HOME"):
        return Path(os.environ["SESSIONTAG_HOME"]).absolute()
    if os.geteuid() == 0:
        return Path("/var/lib/sessiontag")
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "sessiontag"


class LocalServer:
    """A PostgreSQL cluster of sessiontag's own, reached through a private Unix socket."""

    def __init__(self, home: Path | str | None = None):
        self.home = Path(home) if home else default_home()
        self.data = self.home / "data"
        self.socket_dir = self.home / "run"
        self.log = self.home / "server.log"

    # -- state ---------------------------------------------------------------------
    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    def pid(self) -> int | None:
        """Server process id when running, else None."""
        if not self.initialized():
            return None
        result = subprocess.run(pg_argv("pg_ctl", "status", "-D", str(self.data)), capture_output=True, text=True)
        if result.returncode != 0:
            return None
        for token in result.stdout.replace(")", " ").split():
            if token.isdigit():
                return int(token)
        return None

    def dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@/{DATABASE}?host={self.socket_dir}"

    # -- actions -------------------------------------------------------------------
    @contextmanager
    def _locked(self):
        """One CLI process at a time initializes or starts the cluster."""
        try:
            self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
            handle = open(self.home / ".lock", "w")
        except OSError as exc:
            raise SessiontagError(f"cannot use {self.home} for the local server (SESSIONTAG_HOME): "
                                  f"{exc.strerror or exc}") from None
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _run(self, argv: list[str], what: str, log_from: int | None = None) -> None:
        """Runs a server program; on failure, says why in one line: its last line of
        output, or the last FATAL line the server logged after offset ``log_from``."""
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            if log_from is not None:
                with open(self.log, errors="replace") as log:
                    log.seek(log_from)
                    detail += [line.split("FATAL:", 1)[1].strip() for line in log if "FATAL:" in line]
            hint = f" (see {self.log})" if self.log.exists() else ""
            raise SessiontagError(f"{what} failed: {detail[-1] if detail else 'no output'}{hint}")

    def _check_socket_path(self) -> None:
        """The server's Unix socket path must fit in 107 bytes; else it fails to start,
        saying so only in its log."""
        path = os.fsencode(self.socket_dir.absolute() / ".s.PGSQL.5432")
        if len(path) > 107:
            raise SessiontagError(
                f"SESSIONTAG_HOME {self.home} is too long: the local server's Unix socket would be "
                f"{os.fsdecode(path)} ({len(path)} bytes; the limit is 107); set a shorter SESSIONTAG_HOME")

    def _init(self) -> None:
        user = server_user()
        blocked = _unreachable_parent(user, self.home) if user else None
        if blocked is not None:
            raise SessiontagError(
                f"PostgreSQL runs as {user.pw_name}, who cannot enter {blocked}; "
                f"set SESSIONTAG_HOME to a directory outside it (default for root: /var/lib/sessiontag)"
            )
        self.socket_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        hand_over(self.home)
        self._run(
            pg_argv("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                    "--encoding=UTF8", "--locale=C.UTF-8", "--no-instructions"),
            f"initdb in {self.data}",
        )
        with open(self.data / "postgresql.auto.conf", "a") as conf:
            # Unix socket only: the socket directory is private to this account.
            conf.write("listen_addresses = ''\n")
            conf.write(f"unix_socket_directories = '{self.socket_dir}'\n")
            conf.write("max_connections = 100\n")
        hand_over(self.home)

    def start(self) -> bool:
        """Initialize on first use and start; False when it was already running."""
        self._check_socket_path()
        with self._locked():
            if not self.initialized():
                self._init()
            if self.pid() is not None:
                return False
            if not self.log.exists():
                self.log.touch()
            hand_over(self.log)
            self._run(pg_argv("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                              "-o", f"-k {self.socket_dir}"), "starting the local server", self.log.stat().st_size)
            self._create_database()
            return True

    def _create_database(self) -> None:
        import psycopg

        with psycopg.connect(f"postgresql://{SUPERUSER}@/postgres?host={self.socket_dir}", autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DATABASE]).fetchone():
                conn.execute(f'CREATE DATABASE "{DATABASE}"')

    def stop(self) -> bool:
        """Stop the server; False when it was not running."""
        with self._locked():
            if self.pid() is None:
                return False
            self._run(pg_argv("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "60"),
                      "stopping the local server")
            return True

    def ensure_running(self, notice: Callable[[str], None] | None = None) -> str:
        """The server's DSN, starting it first if needed (then telling ``notice`` so)."""
        # Always through start(): it checks under the lock, so a command never connects to
        # a server that another command is still initializing or starting.
        if self.start() and notice is not None:
            notice(f"started the local server (data in {self.data}; 'sessiontag db stop' stops it)")
        return self.dsn()
