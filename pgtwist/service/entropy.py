"""Random bytes for cancel keys: read from the kernel a page at a time, not twice per login."""

from __future__ import annotations

import os

# Every login in transaction pooling gets a process id and a secret of pgtwist's own
# (BackendKeyData), 8 random bytes; through the secrets module that was two getrandom()
# system calls and a handful of Python calls per login. The bytes come from the same
# source (os.urandom: the kernel's CSPRNG), read 4 KiB at a time; each byte is handed out
# once. A forked child must not hand out its parent's bytes again, so the buffer is dropped
# in the child at fork (workers are spawned, not forked, but a fork must stay safe).

_CHUNK = 4096
_buffer = b""
_at = 0


def random_bytes(n: int) -> bytes:
    """*n* bytes from os.urandom, never handed out twice."""
    global _buffer, _at
    at = _at
    end = at + n
    if end > len(_buffer):
        _buffer = os.urandom(max(_CHUNK, n))
        at, end = 0, n
    _at = end
    return _buffer[at:end]


def _forget() -> None:
    global _buffer, _at
    _buffer, _at = b"", 0


os.register_at_fork(after_in_child=_forget)
