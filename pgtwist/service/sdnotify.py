"""systemd's sd_notify(3) over $NOTIFY_SOCKET: READY=1 once the listener is open, STOPPING=1 on drain.

A unit of Type=notify waits for READY=1 before it counts as started, so units ordered after
pgtwist (and `systemctl start` itself) see a pooler that accepts clients, not one still binding.
The protocol is one datagram per message on a unix socket; no library is needed for that.
"""

from __future__ import annotations

import os
import socket

from twisted.logger import Logger

log = Logger()


def notify(state: str, environ=None) -> bool:
    """Send *state* ("READY=1\\nSTATUS=...") to the service manager; False when there is none.

    Never raises: a service manager that went away must not take the pooler with it.
    """
    environ = os.environ if environ is None else environ
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket: a leading NUL byte on the wire
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warn("NOTIFY_SOCKET={address!r} is neither a path nor an abstract socket; not notifying", address=address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as e:
        log.warn("sd_notify to {address!r} failed: {error}", address=environ.get("NOTIFY_SOCKET"), error=e)
        return False
    return True
