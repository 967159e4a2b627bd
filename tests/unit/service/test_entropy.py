"""entropy.random_bytes: os.urandom read a page at a time, each byte handed out once, never across a fork."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pgtwist.service import entropy


@pytest.fixture
def counted(monkeypatch):
    """os.urandom replaced by numbered bytes (so overlaps show), the reads it was asked for kept."""
    reads = []
    made = [0]

    def urandom(n):
        reads.append(n)
        start = made[0]
        made[0] += n
        return bytes((start + i) % 251 for i in range(n))

    monkeypatch.setattr(entropy.os, "urandom", urandom)
    entropy._forget()
    yield reads
    entropy._forget()


def test_one_read_serves_many_logins_and_no_byte_is_given_twice(counted):
    taken = b"".join(entropy.random_bytes(4) for _ in range(2048))  # 1,024 logins' keys
    assert counted == [4096, 4096]
    assert taken == bytes(i % 251 for i in range(8192))


def test_a_request_past_the_end_of_the_buffer_reads_afresh(counted):
    entropy.random_bytes(4094)
    assert len(entropy.random_bytes(4)) == 4  # the 2 bytes left are not enough: dropped, not reused
    assert counted == [4096, 4096]
    assert len(entropy.random_bytes(10000)) == 10000 and counted[-1] == 10000


def test_a_forked_child_does_not_hand_out_its_parents_bytes():
    # In a subprocess: forking pytest's own process (reactor threads and all) is not safe.
    script = """
import os, sys
from pgtwist.service import entropy
entropy.random_bytes(4)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(w, entropy.random_bytes(4))
    os._exit(0)
os.waitpid(pid, 0)
child = os.read(r, 4)
parent = entropy.random_bytes(4)
sys.stdout.write("same" if child == parent else "apart")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout == "apart"
