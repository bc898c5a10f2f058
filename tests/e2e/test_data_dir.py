"""Where the data lives does not depend on the current directory (issue 10, defect 3).

The user ran `loraforge keys create` from another directory: it wrote a second database
(`./.loraforge`), and the server refused the key. Before `db upgrade` the same command
printed a 300-line traceback. Each test runs the real CLI in a child process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """A user with a fresh home and no LORAFORGE_* settings: the defaults apply."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAFORGE_", "XDG_"))}
    return env | {"HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}


def loraforge(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_every_directory_finds_the_same_database(home, tmp_path: Path) -> None:
    assert loraforge(home, REPO, "db", "upgrade").returncode == 0
    made = loraforge(home, tmp_path / "elsewhere", "keys", "create", "--org", "acme")
    assert made.returncode == 0, made.stderr
    listed = loraforge(home, tmp_path / "and" / "elsewhere", "keys", "list")
    assert listed.returncode == 0, listed.stderr
    assert "acme" in listed.stdout and made.stdout.strip()[:8] in listed.stdout
    data_dir = tmp_path / "home" / ".local" / "share" / "loraforge"
    assert f"loraforge data dir: {data_dir} (the default)" in made.stderr
    assert (data_dir / "loraforge.db").is_file()
    assert not list(tmp_path.rglob(".loraforge"))  # no database beside the user's files


def test_keys_before_any_database_says_which_and_how(home, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = home | {"LORAFORGE_DATA_DIR": str(data_dir)}
    for args in (("keys", "create", "--org", "acme"), ("keys", "list"), ("keys", "revoke", "k")):
        result = loraforge(env, tmp_path, *args)
        assert result.returncode == 2 and result.stdout == ""
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) < 10
        assert f"there is no loraforge database at {data_dir / 'loraforge.db'}" in result.stderr
        assert "run `loraforge db upgrade`" in result.stderr and "--data-dir" in result.stderr
    assert not data_dir.exists()  # refusing created nothing


def test_data_dir_option_and_an_old_schema(home, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    assert loraforge(home, tmp_path, "--data-dir", str(data_dir), "db", "upgrade").returncode == 0
    assert (data_dir / "loraforge.db").is_file()
    env = home | {"LORAFORGE_DATA_DIR": str(data_dir)}
    assert loraforge(env, tmp_path, "db", "downgrade", "0001").returncode == 0
    result = loraforge(env, tmp_path, "keys", "create", "--org", "acme")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is at schema revision 0001" in result.stderr
    assert "`loraforge db upgrade`" in result.stderr


@pytest.mark.parametrize("command", [["api", "--port", "1"], ["worker"]])
def test_servers_refuse_an_unmigrated_database(home, tmp_path: Path, command) -> None:
    data_dir = tmp_path / "data"
    env = home | {"LORAFORGE_DATA_DIR": str(data_dir)}
    result = loraforge(env, tmp_path, *command)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"loraforge data dir: {data_dir} (LORAFORGE_DATA_DIR)" in result.stderr
    assert "there is no loraforge database" in result.stderr


def test_an_old_cwd_database_is_pointed_out(home, tmp_path: Path) -> None:
    old = tmp_path / "project" / ".loraforge"
    old.mkdir(parents=True)
    (old / "loraforge.db").touch()
    result = loraforge(home, tmp_path / "project", "keys", "list")
    assert f"set LORAFORGE_DATA_DIR={old}" in result.stderr
