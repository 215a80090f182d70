"""Fixtures for the operations tests: a throw-away PostgreSQL server on loopback and free ports."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_SYSTEM_DEPS = REPO_ROOT / "bin" / "install-system-deps"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin_dir() -> Path | None:
    """The newest Debian PostgreSQL server binary folder (/usr/lib/postgresql/<major>/bin), if any."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    return candidates[-1].parent if candidates else None


def ensure_postgres_installed() -> Path:
    """Return the server binaries, installing Debian's postgresql through bin/install-system-deps if missing.

    Skips the calling test (with the reason) only when the package cannot be installed.
    """
    bin_dir = postgres_bin_dir()
    if bin_dir is not None:
        return bin_dir
    result = subprocess.run([str(INSTALL_SYSTEM_DEPS)], capture_output=True, text=True)
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip(
            "PostgreSQL server binaries are missing and bin/install-system-deps could not install them "
            f"(exit {result.returncode}): {result.stderr.strip()[-500:]}"
        )
    return bin_dir


def ensure_chromium_installed() -> Path:
    """Debian's headless-capable Chromium, installed through bin/install-system-deps if missing."""
    chromium = shutil.which("chromium")
    if chromium is None:
        result = subprocess.run([str(INSTALL_SYSTEM_DEPS)], capture_output=True, text=True)
        chromium = shutil.which("chromium")
        if chromium is None:
            pytest.skip(
                "chromium is missing and bin/install-system-deps could not install it "
                f"(exit {result.returncode}): {result.stderr.strip()[-500:]}"
            )
    return Path(chromium)


@dataclass(frozen=True)
class PostgresServer:
    """Connection facts of a running server; these are the values deploy/postgres/dagster.yaml reads."""

    host: str
    port: int
    username: str
    password: str
    db_name: str

    def env(self) -> dict[str, str]:
        return {
            "DAGSTER_PG_HOST": self.host,
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USERNAME": self.username,
            "DAGSTER_PG_PASSWORD": self.password,
            "DAGSTER_PG_DB": self.db_name,
        }


def _server_command_prefix() -> tuple[list[str], int | None]:
    """How to run server commands: PostgreSQL refuses to run as root, so root drops to the `postgres` user."""
    if os.geteuid() != 0:
        return [], None
    try:
        return ["runuser", "-u", "postgres", "--"], pwd.getpwnam("postgres").pw_uid
    except KeyError:
        pytest.skip("running as root and there is no `postgres` user to run the server as")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A fresh PostgreSQL cluster on 127.0.0.1:<random port> with password (SCRAM) auth and an empty database."""
    bin_dir = ensure_postgres_installed()
    prefix, server_uid = _server_command_prefix()

    def run_as_server_user(command: list[str]) -> None:
        subprocess.run([*prefix, *command], capture_output=True, text=True, check=True)

    # Not under pytest's tmp root: that folder is private to the test user, and the server user must enter it.
    root = Path(tempfile.mkdtemp(prefix="segpipe-pg-"))
    root.chmod(0o755)
    data_dir, socket_dir, password_file = root / "data", root / "socket", root / "password"
    socket_dir.mkdir()
    password = secrets.token_hex(16)
    password_file.write_text(password + "\n")
    if server_uid is not None:
        for path in (root, socket_dir, password_file):
            os.chown(path, server_uid, -1)
    port = free_port()
    try:
        run_as_server_user(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                "dagster",
                f"--pwfile={password_file}",
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-instructions",
            ]
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {socket_dir} -c fsync=off"
        run_as_server_user(
            [
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data_dir),
                "-o",
                options,
                "-l",
                str(root / "server.log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
    except subprocess.CalledProcessError as error:
        log = root / "server.log"
        detail = log.read_text() if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {error.stderr}\n{detail}") from error
    server = PostgresServer(host="127.0.0.1", port=port, username="dagster", password=password, db_name="segpipe")
    try:
        _create_database(bin_dir, server)
        yield server
    finally:
        run_as_server_user([str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)


def _create_database(bin_dir: Path, server: PostgresServer) -> None:
    deadline = time.monotonic() + 30
    env = {**os.environ, "PGPASSWORD": server.password}
    command = [
        str(bin_dir / "createdb"),
        "-h",
        server.host,
        "-p",
        str(server.port),
        "-U",
        server.username,
        server.db_name,
    ]
    while True:
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"createdb {server.db_name} failed: {result.stderr}")
        time.sleep(0.5)


QUIET_INSTANCE_YAML = """\
# Test instance: no telemetry, no first-run pop-up in the UI.
telemetry:
  enabled: false
nux:
  enabled: false
"""


@dataclass(frozen=True)
class DagsterDevServer:
    """A running `dagster dev` (webserver + daemon + code server) and where it keeps its state."""

    url: str
    dagster_home: Path
    work_root: Path
    log_path: Path


def wait_for_webserver(url: str, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> None:
    """Block until the webserver answers /server_info, or raise with the tail of its log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dagster dev exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"dagster dev did not answer within {timeout_s:.0f}s:\n{log_path.read_text()[-4000:]}")


def stop_process_group(process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """SIGTERM the group this test started (dagster dev and the daemon/code servers it spawned), then SIGKILL
    whatever of that group is still there."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterDevServer]:
    """`dagster dev -w workspace.yaml` on 127.0.0.1:<free port>, with a fresh DAGSTER_HOME and work root.

    One server per test module: starting it takes most of a minute on a small machine.
    """
    tmp_path = tmp_path_factory.mktemp("dagster_dev")
    dagster_home, work_root = tmp_path / "dagster_home", tmp_path / "work"
    dagster_home.mkdir()
    work_root.mkdir()
    (dagster_home / "dagster.yaml").write_text(QUIET_INSTANCE_YAML)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "dagster_dev.log"
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "SEGPIPE_ENV": "local", "SEGPIPE_WORK_ROOT": str(work_root)}
    command = [sys.executable, "-m", "dagster", "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_webserver(url, process, log_path, timeout_s=120)
        yield DagsterDevServer(url=url, dagster_home=dagster_home, work_root=work_root, log_path=log_path)
    finally:
        stop_process_group(process)
