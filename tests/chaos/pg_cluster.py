"""A throwaway PostgreSQL cluster for the restart tests (moved out of harness.py whole)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.e2e.stack import free_port


class PostgresCluster:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) on a free port, for restarts.

    The shared server on 5432 is never touched. PostgreSQL refuses to run as root, so
    when the tests run as root the cluster belongs to the `postgres` user.
    """

    def __init__(self) -> None:
        import glob
        import shutil
        import tempfile

        [self.bin] = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1:]
        self.dir = Path(tempfile.mkdtemp(prefix="loraforge-pg-"))
        self.port = free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run(
            "initdb",
            "-D",
            str(self.dir / "data"),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        )

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.as_user, f"{self.bin}/{tool}", *args],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def _ctl(self, action: str, *extra: str) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl",
            action,
            "-D",
            str(self.dir / "data"),
            "-w",
            "-t",
            "60",
            "-l",
            str(self.dir / "server.log"),
            "-o",
            options,
            *extra,
        )

    def start(self) -> None:
        self._ctl("start")

    def restart(self, down_seconds: float) -> None:
        """`pg_ctl stop -m fast` (every connection is cut), stay down a while, start again."""
        self._ctl("stop", "-m", "fast")
        time.sleep(down_seconds)
        self.start()

    def stop(self) -> None:
        import shutil

        try:
            self._ctl("stop", "-m", "immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"
