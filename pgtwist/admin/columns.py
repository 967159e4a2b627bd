"""The kinds of the admin console's columns beyond Python's own: the PostgreSQL types PgBouncer sends.

A column is (name, kind); str, int, float and bool go out as text, int8, float8 and bool. PgBouncer
1.18 sends most counts as int4 and SHOW STATS as numeric, and drivers hand those back as other
Python types (psycopg: int and Decimal; lib/pq: int64 and a string), so a tool written against
PgBouncer reads pgtwist's PgBouncer views with the types it was written for.
"""

from __future__ import annotations

import struct

OID_BYTEA, OID_INT4, OID_NUMERIC = 17, 23, 1700
_I4 = struct.Struct("!i")
_NUMERIC_HEAD = struct.Struct("!hhHh")
_INT4_MAX = 2**31 - 1


class Int4(int):
    """int4: PgBouncer's 'i' columns (ports, pool sizes, counts of connections, microseconds parts)."""

    oid = OID_INT4

    @staticmethod
    def binary(value: int) -> bytes:
        # (Only a process's peak RSS in SHOW MEM could exceed it; PgBouncer's int4 would wrap.)
        return _I4.pack(max(-_INT4_MAX - 1, min(_INT4_MAX, int(value))))


class Numeric(int):
    """numeric with no fraction: PgBouncer's 'N' columns (SHOW STATS, STATS_TOTALS, STATS_AVERAGES)."""

    oid = OID_NUMERIC

    @staticmethod
    def binary(value: int) -> bytes:
        """PostgreSQL's binary numeric: base-10000 digits, most significant first, no trailing zeros."""
        value = int(value)
        sign = 0x4000 if value < 0 else 0
        n, digits = abs(value), []
        while n:
            n, digit = divmod(n, 10000)
            digits.append(digit)
        digits.reverse()
        weight = len(digits) - 1 if digits else 0
        while digits and digits[-1] == 0:
            digits.pop()
        return _NUMERIC_HEAD.pack(len(digits), weight, sign, 0) + b"".join(struct.pack("!h", d) for d in digits)


class Bytea(bytes):
    """bytea: SHOW FDS's scram keys, which pgtwist never shows (always NULL)."""

    oid = OID_BYTEA

    @staticmethod
    def binary(value: bytes) -> bytes:
        return bytes(value)

    @staticmethod
    def text(value: bytes) -> bytes:
        return b"\\x" + bytes(value).hex().encode()


KINDS = (Int4, Numeric, Bytea)
