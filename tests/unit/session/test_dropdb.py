"""dropdb.refused_statement: which client reads hold one DROP DATABASE-like statement, sent again or not."""

import pytest

from pgtwist.session.dropdb import refused_statement
from pgtwist.wire import messages as m


def extended(sql: str, describe: bool = False) -> bytes:
    return m.parse("", sql) + m.bind("", "") + (m.describe("P", "") if describe else b"") + m.execute("") + m.sync()


@pytest.mark.parametrize(
    "read, again, frees",
    [
        (m.query("DROP DATABASE scratch"), True, ("scratch",)),
        (m.query("ALTER DATABASE a RENAME TO b"), True, ("a",)),
        (m.query("CREATE DATABASE c TEMPLATE a"), True, ("a",)),
        (extended("DROP DATABASE scratch"), False, ("scratch",)),
        (extended("DROP DATABASE scratch", describe=True), False, ("scratch",)),
        (m.query("DROP DATABASE a; SELECT 1"), False, ()),  # (PostgreSQL refuses it in a multi-statement text)
        (m.query("SELECT 1"), False, ()),
        (m.query("DROP DATABASE a") + m.query("DROP DATABASE a"), False, ()),
        (extended("DROP DATABASE a") + extended("SELECT 1"), False, ()),
        (m.query("DROP DATABASE a")[:-3], False, ()),  # (not whole)
        (b"", False, ()),
        (None, False, ()),
    ],
)
def test_refused_statement(read, again, frees):
    query, names = refused_statement(read)
    assert names == frees
    assert (query is read) if again else query is None
