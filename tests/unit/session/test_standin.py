"""standin: what the proxy answers in place of a server (failed work, a transaction whose node died)."""

from pgtwist.routing.analysis import classify
from pgtwist.session import standin
from pgtwist.wire import messages as m
from pgtwist.wire import protocol as p
from pgtwist.wire import sqlstate
from pgtwist.wire.framing import pop_messages

FIELDS = m.error_fields("ERROR", sqlstate.CONNECTION_FAILURE, "no node")


def items(data: bytes) -> list:
    buf = bytearray(data)
    return pop_messages(buf, p.MAX_PROTOCOL_MESSAGE)


def kinds(data: bytes) -> str:
    return "".join(chr(t) for t, _ in items(data))


def test_failed_work_answers_each_query_and_each_batch_once():
    work = items(m.query("SELECT 1") + m.parse("", "SELECT 2") + m.bind("", "") + m.execute() + m.sync() + m.query("x"))
    reply, terminated = standin.failed_work(work, FIELDS, p.TX_IDLE)
    assert kinds(reply) == "EZEZEZ" and not terminated
    assert all(body == b"I" for t, body in items(reply) if t == p.READY_FOR_QUERY)
    assert {m.decode_fields(b)["S"] for t, b in items(reply) if t == p.ERROR_RESPONSE} == {"ERROR"}


def test_failed_work_stops_at_terminate():
    reply, terminated = standin.failed_work(items(m.query("SELECT 1") + m.terminate() + m.query("never")), FIELDS, p.TX_FAILED)
    assert kinds(reply) == "EZ" and terminated
    assert items(reply)[-1][1] == b"E"


def test_a_rollback_batch_gets_what_a_server_would_answer():
    batch = items(m.parse("", "ROLLBACK") + m.bind("", "") + m.describe("P", "") + m.execute() + m.sync())
    texts = list(standin.statement_texts(batch, {}))
    assert texts == ["ROLLBACK"] and standin.ends_dead_transaction(classify(t) for t in texts)
    reply = standin.rolled_back(batch)
    assert kinds(reply) == "12nCZ" and items(reply)[-1][1] == b"I"
    assert m.decode_query(items(reply)[3][1]) == "ROLLBACK"  # (a CommandComplete tag is a C string too)


def test_commit_ends_a_dead_transaction_too_but_a_select_does_not():
    assert standin.ends_dead_transaction([classify("COMMIT")])
    assert not standin.ends_dead_transaction([classify("SELECT 1")])


def test_still_aborted_tells_the_death_once_then_25p02():
    told = m.error_response("ERROR", sqlstate.CONNECTION_FAILURE, "lost the connection to node n")
    assert standin.still_aborted(told) == told + m.ready_for_query(p.TX_FAILED)
    reply = standin.still_aborted()
    assert m.decode_fields(items(reply)[0][1])["C"] == sqlstate.IN_FAILED_SQL_TRANSACTION
