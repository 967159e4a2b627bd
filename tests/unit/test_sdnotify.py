"""sd_notify over a real unix datagram socket, as systemd listens on one."""

import socket

import pytest

from pgtwist.service import sdnotify


@pytest.fixture
def listener(tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def test_ready_reaches_the_socket_as_one_datagram(listener):
    path, sock = listener
    assert sdnotify.notify("READY=1\nSTATUS=listening on 127.0.0.1:6432", {"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=listening on 127.0.0.1:6432"


def test_abstract_socket_name():
    name = f"pgtwist-test-{id(object())}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        assert sdnotify.notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STOPPING=1"
    finally:
        sock.close()


def test_no_service_manager_is_not_an_error(tmp_path):
    assert sdnotify.notify("READY=1", {}) is False
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "relative/path"}) is False
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False  # never raises
