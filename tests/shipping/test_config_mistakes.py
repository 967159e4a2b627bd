"""Config mistakes in real runs of `twistd pgbalance`: one line naming the key, exit 78 (EX_CONFIG).

78 is what the systemd unit's RestartPreventExitStatus= and a container's restart policy
see: a config that cannot work is not retried in a loop.
"""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pgtwist.auth import md5_hash
from pgtwist.tools.localcluster import free_port

HOST = "127.0.0.1"
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
ENV.pop("NOTIFY_SOCKET", None)


def config_text(listen: str, node: str = "127.0.0.1:1", extra: str = "") -> str:
    return (
        f'listen = "{listen}"\n'
        'auth_type = "md5"\n'
        f"{extra}"
        "[databases.appdb]\n"
        f'nodes = ["{node}"]\n'
        "[users.app]\n"
        f'password = "{md5_hash("app", "pw")}"\n'
    )


def twistd(path, *args, env=ENV, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(
        TWISTD + ["--nodaemon", "--pidfile=", "--logfile=-", "pgbalance", "--config", str(path), *args],
        capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL,
    )


def one_line(result) -> str:
    assert result.returncode == 78, result
    assert "Traceback" not in result.stderr + result.stdout, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_port_in_use_is_one_line_naming_listen(tmp_path):
    taken = socket.socket()
    taken.bind((HOST, 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        path = tmp_path / "pgbalance.toml"
        path.write_text(config_text(f"{HOST}:{port}"))
        line = one_line(twistd(path))
        assert line == f"{path}: listen: cannot listen on {HOST}:{port}: Address already in use"
    finally:
        taken.close()


def test_a_metrics_port_in_use_names_metrics_listen(tmp_path):
    taken = socket.socket()
    taken.bind((HOST, 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        path = tmp_path / "pgbalance.toml"
        path.write_text(config_text(f"{HOST}:{free_port(HOST)}") + f'[metrics]\nlisten = "{HOST}:{port}"\n')
        line = one_line(twistd(path))
        assert line == f"{path}: metrics.listen: cannot listen on {HOST}:{port}: Address already in use"
    finally:
        taken.close()


def test_an_address_not_on_this_machine_names_listen(tmp_path):
    path = tmp_path / "pgbalance.toml"
    path.write_text(config_text("192.0.2.1:6432"))  # TEST-NET-1: never bound here, never contacted
    line = one_line(twistd(path))
    assert line.startswith(f"{path}: listen: cannot listen on 192.0.2.1:6432: "), line


def test_a_host_that_cannot_be_a_host_is_caught_by_check(tmp_path):
    path = tmp_path / "pgbalance.toml"
    path.write_text(config_text(f"{HOST}:{free_port(HOST)}", node="db 1.internal:5432"))
    result = twistd(path, "--check")
    assert result.returncode == 78 and "OK" not in result.stdout
    assert "databases.appdb.nodes[0]: 'db 1.internal' cannot be a host name or IP address" in result.stderr


def _tls_config(tmp_path, key) -> "Path":
    from pgtwist.tools import testcerts

    cert, _ = testcerts.issue(testcerts.make_ca(), "localhost", dns=("localhost",)).write(tmp_path, "server")
    path = tmp_path / "pgbalance.toml"
    tls = f'[tls]\nmode = "require"\ncert = "{cert}"\nkey = "{key}"\n'
    path.write_text(config_text(f"{HOST}:{free_port(HOST)}").replace("[databases.appdb]", tls + "[databases.appdb]"))
    return path


def test_a_key_that_is_not_a_key_is_caught_by_check(tmp_path):
    key = tmp_path / "broken.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    result = twistd(_tls_config(tmp_path, key), "--check")
    assert result.returncode == 78 and "OK" not in result.stdout, result
    assert f"tls.key: cannot load an unencrypted PEM private key from {key}" in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode: run as another user to see this one")
def test_an_unreadable_key_is_caught_by_check(tmp_path):
    from pgtwist.tools import testcerts

    _, key = testcerts.issue(testcerts.make_ca(), "other").write(tmp_path, "other")
    key.chmod(0)
    result = twistd(_tls_config(tmp_path, key), "--check")
    assert result.returncode == 78, result
    assert f"tls.key: cannot load an unencrypted PEM private key from {key}: [Errno 13] Permission denied" in result.stderr


def test_ready_reaches_notify_socket_once_clients_can_connect_and_sigterm_says_stopping(tmp_path):
    notify_path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(30)
    port = free_port(HOST)
    path = tmp_path / "pgbalance.toml"
    path.write_text(config_text(f"{HOST}:{port}") .replace("[databases", "shutdown_timeout = 2.0\n[databases", 1))
    process = subprocess.Popen(
        TWISTD + ["--nodaemon", "--pidfile=", "--logfile=-", "pgbalance", "--config", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(ENV, NOTIFY_SOCKET=notify_path), stdin=subprocess.DEVNULL,
    )
    try:
        message = notify.recv(4096).decode()
        assert message.startswith("READY=1\n") and f"STATUS=accepting clients on {HOST}:{port}" in message, message
        with socket.create_connection((HOST, port), timeout=5):  # READY=1 meant it: the listener is open
            pass
        process.send_signal(signal.SIGTERM)
        assert notify.recv(4096).decode().startswith("STOPPING=1")
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        process.stdout.close()
        notify.close()


def test_pgtwist_run_is_twistd_pgbalance_and_exits_78_the_same_way(tmp_path):
    taken = socket.socket()
    taken.bind((HOST, 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        path = tmp_path / "pgbalance.toml"
        path.write_text(config_text(f"{HOST}:{port}"))
        result = subprocess.run(
            [sys.executable, "-m", "pgtwist.tools.cli", "run", "--config", str(path)],
            capture_output=True, text=True, timeout=60, env=ENV, stdin=subprocess.DEVNULL,
        )
        assert one_line(result) == f"{path}: listen: cannot listen on {HOST}:{port}: Address already in use"
    finally:
        taken.close()
