"""The client session's transition table: illegal moves raise, and docs/ARCHITECTURE.md shows the table in code."""

import ast
import pathlib
import re

import pytest

from pgtwist.session import states
from pgtwist.session.client import ClientSession
from pgtwist.session.placement import Placement
from pgtwist.session.states import ADMIN, CLOSED, IDLE, LINKED, LOGIN, NEXT, PREPARING, TRANSITIONS, WAITING, IllegalTransition

from tests.harness.session import Harness

ALL = (LOGIN, IDLE, WAITING, PREPARING, LINKED, ADMIN, CLOSED)


ROOT = pathlib.Path(__file__).resolve().parents[3]


def _session_in(state):
    """A ClientSession put in *state* by hand (the compiled core takes no stand-in for one)."""
    s, _ = Harness().client(login=False)
    s.state = state
    return s


def _method_source(name: str) -> str:
    """The source of ClientSession's method *name*, read from its .py file (compiled, it has no other)."""
    for path in ("pgtwist/session/client.py", "pgtwist/session/admission.py"):
        source = (ROOT / path).read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and node.name == name:
                return ast.get_source_segment(source, node)
    raise AssertionError(f"no method {name}")


DOC = ROOT / "docs" / "ARCHITECTURE.md"


def _doc_rows():
    text = DOC.read_text()
    section = text.split("## The client's state machine", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in ALL:
            rows.append(tuple(cells))
    return rows


def test_the_doc_shows_the_table_in_code():
    assert [row[:3] for row in _doc_rows()] == list(TRANSITIONS)


def test_the_doc_names_the_methods_that_make_each_move():
    """The first names in "where in code" call _enter() with that row's next state; the "from" names exist."""
    for frm, event, to, where in _doc_rows():
        enterers = re.findall(r"`([\w.]+)`", re.sub(r"\([^)]*\)", "", where))
        assert enterers, (frm, event, to)
        for name in enterers:
            assert hasattr(ClientSession, name), name
            source = _method_source(name)
            assert f"self._enter({to.upper()})" in source, (name, frm, to)
        for name in re.findall(r"`([\w.]+)`", "".join(re.findall(r"\([^)]*\)", where))):
            owner, _, attr = name.rpartition(".")
            assert hasattr(Placement if owner == "Placement" else ClientSession, attr), name


def test_every_legal_move_is_allowed():
    for frm, _, to in TRANSITIONS:
        s = _session_in(frm)
        s._enter(to)
        assert s.state == to


@pytest.mark.parametrize("frm,to", [(f, t) for f in ALL for t in ALL if t not in NEXT[f]])
def test_an_illegal_move_raises_and_changes_nothing(frm, to):
    s = _session_in(frm)
    with pytest.raises(IllegalTransition) as caught:
        s._enter(to)
    assert s.state == frm and (caught.value.frm, caught.value.to) == (frm, to)


@pytest.mark.parametrize(
    "frm,to",
    [(CLOSED, IDLE), (CLOSED, LINKED), (IDLE, LINKED), (IDLE, PREPARING), (LOGIN, LINKED), (ADMIN, IDLE), (WAITING, ADMIN)],
)
def test_moves_that_would_be_bugs_are_refused(frm, to):
    with pytest.raises(IllegalTransition):
        _session_in(frm)._enter(to)


def test_every_state_can_close_and_closing_is_final():
    for state in ALL:
        assert CLOSED in NEXT[state]
    assert NEXT[CLOSED] == {CLOSED}


def test_the_table_names_only_known_states():
    assert set(NEXT) == set(ALL)
    assert all(frm in ALL and to in ALL and event for frm, event, to in TRANSITIONS)
    assert len(set((f, t) for f, _, t in TRANSITIONS)) == len(TRANSITIONS)  # one row per move
    assert re.fullmatch(r"[a-z]+", states.LOGIN)
