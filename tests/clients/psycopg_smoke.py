"""psycopg 3 against Sluice: server-side parameters, binary results, errors."""
import datetime
import decimal
import sys

import psycopg

port = sys.argv[1]
with psycopg.connect(f"host=127.0.0.1 port={port} user=py dbname=sluice connect_timeout=10", autocommit=True) as conn:
    conn.execute("CREATE TABLE pt (id BIGINT PRIMARY KEY, name TEXT, score DOUBLE PRECISION, d DATE, tags TEXT[])")
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO pt VALUES (%s, %s, %s, %s, %s)",
            [(i, f"n{i}", i / 4, datetime.date(2024, 1, i), [f"t{i}", "x"]) for i in range(1, 6)],
        )
    row = conn.execute("SELECT name, score, d, tags FROM pt WHERE id = %s", (2,)).fetchone()
    assert row == ("n2", 0.5, datetime.date(2024, 1, 2), ["t2", "x"]), row
    with conn.cursor(binary=True) as cur:
        cur.execute("SELECT id, score FROM pt WHERE id >= %s ORDER BY id", (4,))
        assert cur.fetchall() == [(4, 1.0), (5, 1.25)]
    total = conn.execute("SELECT sum(id) FROM pt").fetchone()[0]
    assert total == 15, total
    try:
        conn.execute("INSERT INTO pt (id) VALUES (%s)", (1,))
        raise AssertionError("duplicate accepted")
    except psycopg.errors.UniqueViolation:
        pass
    try:
        conn.execute("SELECT * FROM missing")
        raise AssertionError("missing table accepted")
    except psycopg.errors.UndefinedTable:
        pass
    assert conn.execute("SELECT 1 + 1").fetchone()[0] == 2

    # Server-side (named) cursors: DECLARE, the cursor described as a
    # portal by name, FETCH FORWARD n, CLOSE — inside a transaction.
    with psycopg.connect(f"host=127.0.0.1 port={port} user=py dbname=sluice connect_timeout=10") as tx:
        with tx.cursor("named") as cur:
            cur.execute("SELECT id, name FROM pt WHERE id > %s ORDER BY id", (1,))
            assert cur.fetchmany(2) == [(2, "n2"), (3, "n3")]
            assert cur.fetchall() == [(4, "n4"), (5, "n5")]
        tx.commit()
        # A subscription through a cursor: the snapshot, then a change.
        with tx.cursor() as cur:
            cur.execute("DECLARE s CURSOR FOR SUBSCRIBE (SELECT count(*) AS n FROM pt)")
            cur.execute("FETCH ALL s")
            assert [(r[1], r[2]) for r in cur.fetchall()] == [(1, 5)]
            conn.execute("INSERT INTO pt (id) VALUES (6)")
            cur.execute("FETCH ALL s WITH (TIMEOUT = '10s')")
            got = sorted((r[1], r[2]) for r in cur.fetchall())
            assert got == [(-1, 5), (1, 6)], got
        tx.rollback()
print("psycopg ok")
