"""cluster/evidence.py: what the end of one server connection says about its node."""

import pytest

from pgtwist.cluster import evidence


def fatal(code, message="x"):
    return {"S": "FATAL", "V": "FATAL", "C": code, "M": message}


@pytest.mark.parametrize(
    "fields, verdict, deliberate",
    [
        (None, evidence.DOWN, False),  # reset, or closed without a word
        (fatal("57P02", "terminating connection because of crash of another server process"), evidence.DOWN, False),
        (fatal("57P03", "the database system is shutting down"), evidence.DOWN, False),
        (fatal("08006", "could not connect"), evidence.DOWN, False),  # pgtwist's own: refused, timed out
        (fatal("57P01", "terminating connection due to administrator command"), evidence.UNSURE, True),
        (fatal("08P01", "invalid frontend message type 122"), evidence.NOT_THE_NODE, True),
        (fatal("25P03", "terminating connection due to idle-in-transaction timeout"), evidence.NOT_THE_NODE, True),
        (fatal("57P05", "terminating connection due to idle-session timeout"), evidence.NOT_THE_NODE, True),
        (fatal("53200", "out of memory"), evidence.NOT_THE_NODE, True),
        (fatal("28P01", "password authentication failed"), evidence.NOT_THE_NODE, True),
        ({"S": "FATAL", "M": "no SQLSTATE at all"}, evidence.NOT_THE_NODE, True),
    ],
)
def test_connection_ended(fields, verdict, deliberate):
    assert evidence.connection_ended(fields) is verdict
    assert evidence.deliberate(fields) is deliberate
