"""internal_batch: the proxy's own statements under its own names, encoded once per distinct batch."""

from pgtwist.pooling import statements
from pgtwist.pooling.statements import INTERNAL_NAME, internal_batch
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p

from tests.harness.session import messages


def test_a_batch_is_close_parse_bind_execute_close_per_statement_and_one_sync():
    sent = messages(internal_batch(["SELECT 1", "SHOW search_path"]))
    assert [t for t, _ in sent] == [p.CLOSE, p.CLOSE] + [p.PARSE, p.BIND, p.EXECUTE, p.CLOSE, p.CLOSE] * 2 + [p.SYNC]
    assert [m.decode_parse(b)[:2] for t, b in sent if t == p.PARSE] == [(INTERNAL_NAME, "SELECT 1"), (INTERNAL_NAME, "SHOW search_path")]


def test_a_recurring_batch_is_encoded_once_and_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(statements, "_BATCHES", {})
    monkeypatch.setattr(statements, "_BATCHES_LIMIT", 3)
    first = internal_batch(["SELECT pg_catalog.pg_current_wal_insert_lsn()"])
    assert internal_batch(["SELECT pg_catalog.pg_current_wal_insert_lsn()"]) is first
    for i in range(10):  # (read-back batches name what a client set: any number of spellings)
        assert messages(internal_batch([f"SHOW x.y{i}"]))[2][0] == p.PARSE
        assert len(statements._BATCHES) <= 3
    assert internal_batch(["SHOW x.y9"]) == statements._encode_batch(["SHOW x.y9"])
    long = ["SELECT '" + "v" * 600 + "'"]  # (a value a client chose: encoded, never kept)
    assert messages(internal_batch(long))[2][0] == p.PARSE and tuple(long) not in statements._BATCHES
