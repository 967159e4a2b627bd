"""pgtwist/wire/protocol.py: its message type bytes are written as numbers (Final literals, which
mypyc compiles to the number itself); each must be the letter its comment names, as the protocol
docs spell the message."""

import re
from pathlib import Path

from pgtwist.wire import protocol as p

SOURCE = Path(p.__file__).with_suffix(".py").read_text()


def test_each_message_type_byte_is_the_letter_beside_it():
    rows = re.findall(r'^([A-Z_0-9]+): Final = (\d+)  # "(.)"', SOURCE, flags=re.M)
    assert len(rows) >= 38
    for name, value, letter in rows:
        assert getattr(p, name) == int(value) == ord(letter), name


def test_the_ones_every_session_uses():
    assert (p.QUERY, p.SYNC, p.TERMINATE, p.READY_FOR_QUERY, p.TX_IDLE, p.TX_IN_TRANSACTION, p.TX_FAILED) == tuple(b"QSXZITE")
    assert p.CANCEL_REQUEST_CODE == 80877102 and p.SSL_REQUEST_CODE == 80877103 and p.PROTOCOL_3_0 == 196608
