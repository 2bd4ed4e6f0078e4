"""Coverage: every relation a user can point copystream at, named as a psql user types it.

Names: schema-qualified, quoted mixed case, spaces, quotes, semicolons, unicode, reserved words,
unqualified names under a search_path; each beside a decoy that a wrong resolution would export
instead. Relations: range-, list- and multi-level partitioned tables (through the parent, with a
default partition), inheritance parents (children's rows included, as ``SELECT * FROM parent``
returns them), materialized views with and without a unique index, plain views and file_fdw
foreign tables (``--key``), and empty and one-row relations of each kind. The reference is
always psql's ``\\copy (SELECT * FROM <name> ORDER BY <key>) TO STDOUT``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import copystream
from copystream import KeyProblem, export_table

pytestmark = pytest.mark.all_versions  # also run on PostgreSQL 18 (.ci/run)

PsqlCsv = Callable[..., bytes]
RunSql = Callable[[str, str], list[tuple[Any, ...]]]


def _manifest(out: Path) -> dict[str, Any]:
    return dict(json.loads(out.with_name(out.name + ".manifest.json").read_bytes()))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "copystream", *args], capture_output=True, text=True, timeout=120
    )


def _assert_refused(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    detail = f"exit {proc.returncode}\nstdout={proc.stdout!r}\nstderr={proc.stderr!r}"
    assert proc.returncode == 2, detail
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("copystream: error: "), detail
    for needle in needles:
        assert needle in lines[0], f"{needle!r} missing\n{detail}"


def _export_and_compare(
    conninfo: str,
    name: str,
    out: Path,
    expected: bytes,
    *,
    chunk_sizes: tuple[int | None, ...] = (1, 3, None),
    **kw: Any,
) -> copystream.ExportResult:
    result = None
    for chunk_rows in chunk_sizes:
        target = out.with_name(f"{out.stem}-{chunk_rows}{out.suffix}")
        result = export_table(conninfo, name, target, chunk_rows=chunk_rows, **kw)
        assert target.read_bytes() == expected, f"{name} chunk_rows={chunk_rows}"
        verified = copystream.verify_file(target)
        assert verified.rows == result.rows
    assert result is not None
    return result


# -- names as typed in psql -------------------------------------------------------------------

#: (how the table is created, how the user types it, its qualified name in the manifest)
NAMES = [
    pytest.param("s1.t", "s1.t", "s1.t", id="schema-qualified"),
    pytest.param('"MyTable"', '"MyTable"', 'public."MyTable"', id="quoted-mixed-case"),
    pytest.param("mytable", "MYTABLE", "public.mytable", id="unquoted-folds-to-lower"),
    pytest.param('"My Table"', '"My Table"', 'public."My Table"', id="space"),
    pytest.param('"quo""te"', '"quo""te"', 'public."quo""te"', id="double-quote"),
    pytest.param('"semi;colon"', '"semi;colon"', 'public."semi;colon"', id="semicolon"),
    pytest.param('"ünïcödé 表"', '"ünïcödé 表"', 'public."ünïcödé 表"', id="unicode"),
    pytest.param('"Ünï"', "Ünï", 'public."Ünï"', id="unquoted-unicode-keeps-case"),
    pytest.param('"order"', '"order"', 'public."order"', id="reserved-order"),
    pytest.param('"select"', 'public."select"', 'public."select"', id="reserved-select"),
    pytest.param(
        '"Sales"."Q1 ""Orders"", final;"',
        '"Sales"."Q1 ""Orders"", final;"',
        '"Sales"."Q1 ""Orders"", final;"',
        id="schema-and-table-all-at-once",
    ),
]

DECOYS = '''
CREATE SCHEMA s1; CREATE SCHEMA "Sales";
CREATE TABLE public.t (id int PRIMARY KEY, v text); INSERT INTO public.t VALUES (1, 'decoy');
CREATE TABLE "Mytable" (id int PRIMARY KEY, v text); INSERT INTO "Mytable" VALUES (1, 'decoy');
CREATE TABLE "MYTABLE" (id int PRIMARY KEY, v text); INSERT INTO "MYTABLE" VALUES (1, 'decoy');
CREATE TABLE "ünï" (id int PRIMARY KEY, v text); INSERT INTO "ünï" VALUES (1, 'decoy');
CREATE TABLE "Sales"."Q1 ""Orders""" (id int PRIMARY KEY, v text);
'''


@pytest.mark.parametrize(("create", "typed", "qualified"), NAMES)
def test_names_as_typed_in_psql(
    dsn: str,
    run_sql: RunSql,
    psql_csv: PsqlCsv,
    tmp_path: Path,
    create: str,
    typed: str,
    qualified: str,
) -> None:
    run_sql(dsn, DECOYS)
    if create != "mytable":
        run_sql(dsn, "CREATE TABLE mytable (id int PRIMARY KEY, v text); "
                     "INSERT INTO mytable VALUES (1, 'decoy')")  # fmt: skip
    run_sql(
        dsn,
        f"""CREATE TABLE IF NOT EXISTS {create} (id int PRIMARY KEY, v text);
            DELETE FROM {create};
            INSERT INTO {create} SELECT g, 'real ' || g || ', "q"' FROM generate_series(1, 7) g;""",
    )
    expected = psql_csv(dsn, f"SELECT * FROM {typed} ORDER BY id")
    assert b"real 1" in expected and b"decoy" not in expected
    result = _export_and_compare(dsn, typed, tmp_path / "o.csv", expected)
    assert result.table == qualified
    assert _manifest(tmp_path / "o-None.csv")["table"] == qualified
    # the CLI resolves the same name the same way
    out = tmp_path / "cli.csv"
    proc = _cli("export", typed, str(out), "--dsn", dsn, "--chunk-rows", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == expected


@pytest.mark.parametrize(
    ("search_path", "table", "want"),
    [
        ("s2, s1, public", "t", "s2"),
        ("s1, s2", "t", "s1"),
        ('"$user", public', "t", "postgres"),
        ("s2, s1", "only_in_s1", "s1"),
        ("s1", "public.t", "public"),
        ('"Odd Schema", s1', "t", "Odd Schema"),
    ],
)
def test_unqualified_names_follow_search_path(
    dsn: str,
    run_sql: RunSql,
    psql_csv: PsqlCsv,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    search_path: str,
    table: str,
    want: str,
) -> None:
    for schema in ("s1", "s2", "postgres", "Odd Schema", "public"):
        run_sql(
            dsn,
            f"""CREATE SCHEMA IF NOT EXISTS "{schema}";
                CREATE TABLE "{schema}".t (id int PRIMARY KEY, src text);
                INSERT INTO "{schema}".t SELECT g, '{schema}' FROM generate_series(1, 5) g;""",
        )
    run_sql(dsn, "CREATE TABLE s1.only_in_s1 (id int PRIMARY KEY, src text); "
                 "INSERT INTO s1.only_in_s1 VALUES (1, 's1'), (2, 's1')")  # fmt: skip
    # PGOPTIONS separates options by spaces: a space inside a value is escaped with a backslash
    pgoptions = "-c search_path=" + search_path.replace(", ", ",").replace(" ", "\\ ")
    psql_env = {"PGOPTIONS": pgoptions}
    expected = psql_csv(dsn, f"SELECT * FROM {table} ORDER BY id", env=psql_env)
    assert expected.count(want.encode()) == expected.count(b"\n")
    base = table.rsplit(".", 1)[-1]
    qualified = (f'"{want}"' if " " in want else want) + "." + base
    # through the dsn's options
    conninfo = f"{dsn} options='{pgoptions.replace(chr(92), chr(92) * 2)}'"
    result = _export_and_compare(conninfo, table, tmp_path / "dsn.csv", expected, chunk_sizes=(2,))
    assert result.table == qualified
    # through PGOPTIONS
    monkeypatch.setenv("PGOPTIONS", psql_env["PGOPTIONS"])
    result = _export_and_compare(dsn, table, tmp_path / "env.csv", expected, chunk_sizes=(2,))
    assert result.table == qualified


# -- partitioned tables -----------------------------------------------------------------------

PARTITIONED = """
CREATE TABLE r (id bigint PRIMARY KEY, v text) PARTITION BY RANGE (id);
CREATE TABLE r_low PARTITION OF r FOR VALUES FROM (MINVALUE) TO (100);
CREATE TABLE r_mid PARTITION OF r FOR VALUES FROM (100) TO (200) PARTITION BY RANGE (id);
CREATE TABLE r_mid_a PARTITION OF r_mid FOR VALUES FROM (100) TO (150);
CREATE TABLE r_mid_b PARTITION OF r_mid FOR VALUES FROM (150) TO (200);
CREATE TABLE r_default PARTITION OF r DEFAULT;
-- inserted out of key order, so that partition order is not key order by accident
INSERT INTO r SELECT (g * 37) % 400 - 50, 'r' || g FROM generate_series(0, 399) g
    ON CONFLICT DO NOTHING;

CREATE TABLE l (region text COLLATE "C", id int, v text, PRIMARY KEY (region, id))
    PARTITION BY LIST (region);
CREATE TABLE l_eu PARTITION OF l FOR VALUES IN ('de', 'fr', 'Nl');
CREATE TABLE l_us PARTITION OF l FOR VALUES IN ('us', 'CA');
CREATE TABLE l_other PARTITION OF l DEFAULT;
INSERT INTO l SELECT (ARRAY['de', 'us', 'fr', 'CA', 'zz', 'Nl', 'ar', 'Ω'])[1 + g % 8], g, 'l' || g
    FROM generate_series(1, 120) g;
"""


@pytest.mark.parametrize(
    ("table", "order", "partitions"),
    [("r", "id", 4), ("l", "region, id", 3)],
    ids=["range-multilevel-default", "list-default"],
)
def test_partitioned_table_through_its_parent(
    dsn: str,
    run_sql: RunSql,
    psql_csv: PsqlCsv,
    tmp_path: Path,
    table: str,
    order: str,
    partitions: int,
) -> None:
    run_sql(dsn, PARTITIONED)
    assert int(run_sql(dsn, f"SELECT count(*) FROM pg_partition_tree('{table}') "
                            "WHERE isleaf")[0][0]) == partitions  # fmt: skip
    default_rows = run_sql(dsn, f"SELECT count(*) FROM {table}_default" if table == "r"
                           else "SELECT count(*) FROM l_other")[0][0]  # fmt: skip
    assert default_rows > 0  # the default partition holds rows too
    expected = psql_csv(dsn, f"SELECT * FROM {table} ORDER BY {order}")
    assert expected.count(b"\n") == int(run_sql(dsn, f"SELECT count(*) FROM {table}")[0][0])
    result = _export_and_compare(
        dsn, table, tmp_path / f"{table}.csv", expected, chunk_sizes=(1, 7, 0, None)
    )
    assert result.key_source == "primary key"
    assert result.key == tuple(order.split(", "))
    # with a header, and a single partition on its own
    expected = psql_csv(dsn, f"SELECT * FROM {table} ORDER BY {order}", "FORMAT csv, HEADER")
    _export_and_compare(dsn, table, tmp_path / "h.csv", expected, chunk_sizes=(4,), header=True)
    part = "r_mid" if table == "r" else "l_eu"
    expected = psql_csv(dsn, f"SELECT * FROM {part} ORDER BY {order}")
    _export_and_compare(dsn, part, tmp_path / "part.csv", expected, chunk_sizes=(3,))


def test_altered_tables_and_partitions_with_another_column_order(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """Dropped, added and renamed columns; a partition attached with its own column order."""
    run_sql(
        dsn,
        """CREATE TABLE alt (id int PRIMARY KEY, gone text, a text, b int);
           INSERT INTO alt SELECT g, 'x', 'a' || g, g FROM generate_series(1, 12) g;
           ALTER TABLE alt DROP COLUMN gone;
           ALTER TABLE alt ADD COLUMN added numeric DEFAULT 1.50;
           ALTER TABLE alt RENAME COLUMN b TO "B renamed";
           ALTER TABLE alt ADD COLUMN gen int GENERATED ALWAYS AS ("B renamed" * 2) STORED;
           CREATE TABLE pt (id int PRIMARY KEY, v text, w date) PARTITION BY RANGE (id);
           CREATE TABLE pt_a (w date, junk int, v text, id int NOT NULL);
           ALTER TABLE pt_a DROP COLUMN junk;
           INSERT INTO pt_a SELECT date '2024-01-01' + g, 'a' || g, g FROM generate_series(1, 9) g;
           ALTER TABLE pt ATTACH PARTITION pt_a FOR VALUES FROM (0) TO (10);
           CREATE TABLE pt_b PARTITION OF pt FOR VALUES FROM (10) TO (20);
           INSERT INTO pt SELECT g, 'b' || g, date '2025-01-01' + g FROM generate_series(10, 19) g;
        """,
    )
    for name in ("alt", "pt"):
        expected = psql_csv(dsn, f"SELECT * FROM {name} ORDER BY id", "FORMAT csv, HEADER")
        _export_and_compare(
            dsn, name, tmp_path / f"{name}.csv", expected, chunk_sizes=(1, 5, None), header=True
        )


# -- inheritance ------------------------------------------------------------------------------

INHERITANCE = """
CREATE TABLE parent (id int PRIMARY KEY, v text);
CREATE TABLE child_a (a_extra text) INHERITS (parent);
CREATE TABLE child_b (b_extra int) INHERITS (parent);
CREATE TABLE grandchild (g_extra text) INHERITS (child_a);
INSERT INTO parent SELECT g, 'parent ' || g FROM generate_series(1, 40, 3) g;
INSERT INTO child_a SELECT g, 'a ' || g, 'xa' FROM generate_series(2, 40, 3) g;
INSERT INTO child_b SELECT g, 'b ' || g, g FROM generate_series(3, 40, 6) g;
INSERT INTO grandchild SELECT g, 'gc ' || g, 'xg', 'yy' FROM generate_series(6, 40, 6) g;
"""


def test_inheritance_parent_includes_its_children(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    run_sql(dsn, INHERITANCE)
    expected = psql_csv(dsn, "SELECT * FROM parent ORDER BY id")
    assert expected.count(b"\n") == 40 and b"gc 6" in expected
    assert expected != psql_csv(dsn, "SELECT * FROM ONLY parent ORDER BY id")
    _export_and_compare(dsn, "parent", tmp_path / "p.csv", expected, chunk_sizes=(1, 4, 7, None))
    # a middle level exports itself and its own children
    expected = psql_csv(dsn, "SELECT * FROM child_a ORDER BY id")
    _export_and_compare(dsn, "child_a", tmp_path / "a.csv", expected, chunk_sizes=(2,), key="id")


def test_inheritance_children_repeating_the_parents_key(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """The parent's primary key does not cover its children: ids repeat across the hierarchy.

    Paged as a unique key, a chunk ending inside such a tie lost the rest of it.
    """
    run_sql(
        dsn,
        INHERITANCE
        + """
        INSERT INTO child_a SELECT g, 'dup a ' || g, 'x' FROM generate_series(1, 40, 2) g;
        INSERT INTO child_b SELECT g, 'dup b ' || g, -g FROM generate_series(1, 40, 5) g;""",
    )
    expected = psql_csv(dsn, "SELECT * FROM parent ORDER BY id")
    n = int(run_sql(dsn, "SELECT count(*) FROM parent")[0][0])
    assert n > 60 and expected.count(b"\n") == n
    for chunk_rows in (1, 2, 3, 5, 7, None):
        out = tmp_path / f"p-{chunk_rows}.csv"
        result = export_table(dsn, "parent", out, chunk_rows=chunk_rows)
        data = out.read_bytes()
        assert result.rows == n, f"chunk_rows={chunk_rows}"
        # order within a tie is not defined: compare the multiset of lines, and the key order
        assert Counter(data.splitlines()) == Counter(expected.splitlines()), chunk_rows
        ids = [int(line.split(b",", 1)[0]) for line in data.splitlines()]
        assert ids == sorted(ids)
        assert any("inheritance" in w for w in result.warnings)
        copystream.verify_file(out)


# -- materialized views, views, foreign tables ------------------------------------------------

BASE = """
CREATE TABLE base (id int PRIMARY KEY, grp text NOT NULL, v text);
INSERT INTO base SELECT g, 'g' || (g % 4), CASE WHEN g % 5 = 0 THEN NULL ELSE 'v,"' || g || '"' END
    FROM generate_series(1, 30) g;
"""


def test_materialized_view_with_unique_index_pages_automatically(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    run_sql(
        dsn,
        BASE
        + """
        CREATE MATERIALIZED VIEW mv AS SELECT id * 2 AS k, grp, v FROM base WHERE id % 7 <> 0;
        CREATE UNIQUE INDEX mv_k ON mv (k);""",
    )
    expected = psql_csv(dsn, "SELECT * FROM mv ORDER BY k")
    result = _export_and_compare(dsn, "mv", tmp_path / "mv.csv", expected)
    assert result.key == ("k",) and result.key_source == "unique index mv_k"
    assert _manifest(tmp_path / "mv-1.csv")["key_source"] == "unique index mv_k"


def test_materialized_view_without_index_needs_key(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    run_sql(dsn, BASE + "CREATE MATERIALIZED VIEW mv AS SELECT grp, id, v FROM base;")
    proc = _cli("export", "mv", str(tmp_path / "x.csv"), "--dsn", dsn, "--no-progress")
    _assert_refused(proc, "public.mv", "--key")
    assert list(tmp_path.iterdir()) == []
    expected = psql_csv(dsn, "SELECT * FROM mv ORDER BY grp, id")
    result = _export_and_compare(dsn, "mv", tmp_path / "mv.csv", expected, key=["grp", "id"])
    assert result.key_source == "--key"
    # a key with a NULL in it is refused (its rows would be skipped)
    with pytest.raises(KeyProblem, match="nullable"):
        export_table(dsn, "mv", tmp_path / "v.csv", key="v")
    assert not (tmp_path / "v.csv").exists()


def test_unpopulated_materialized_view_is_refused(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    run_sql(dsn, BASE + "CREATE MATERIALIZED VIEW mv AS SELECT id, v FROM base WITH NO DATA;"
                        "CREATE UNIQUE INDEX mv_id ON mv (id);")  # fmt: skip
    out = tmp_path / "mv.csv"
    proc = _cli("export", "mv", str(out), "--dsn", dsn, "--no-progress", "--retries", "1")
    assert proc.returncode in (1, 2), proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[-1].startswith("copystream: error: ") and "populated" in lines[-1], lines


@pytest.mark.parametrize(
    "view",
    [
        "SELECT id, grp, v FROM base WHERE id > 3",
        "SELECT b.grp, b.id, upper(b.v) AS up FROM base b JOIN base c ON c.id = b.id",
    ],
    ids=["simple", "join"],
)
def test_view_with_key(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path, view: str
) -> None:
    run_sql(dsn, BASE + f'CREATE VIEW "Active View" AS {view};')
    name = '"Active View"'
    proc = _cli("export", name, str(tmp_path / "x.csv"), "--dsn", dsn, "--no-progress")
    _assert_refused(proc, '"Active View"', "--key")
    expected = psql_csv(dsn, f"SELECT * FROM {name} ORDER BY id")
    result = _export_and_compare(dsn, name, tmp_path / "v.csv", expected, key="id")
    assert result.key == ("id",) and result.table == 'public."Active View"'
    out = tmp_path / "cli.csv"
    proc = _cli("export", name, str(out), "--dsn", dsn, "--key", "id", "--chunk-rows", "4",
                "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == expected


@pytest.fixture
def fdw_dir() -> Iterator[Path]:
    """A directory the server (OS user ``postgres`` when tests run as root) can read."""
    d = Path(tempfile.mkdtemp(prefix="copystream-fdw-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_foreign_table_via_file_fdw(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path, fdw_dir: Path
) -> None:
    data = fdw_dir / "people.csv"
    rows = [f'{i},"name {i}, ""q""",{"" if i % 4 == 0 else i * 1.5}\n' for i in range(40, 0, -1)]
    data.write_text("id,name,score\n" + "".join(rows) + '41,"multi\nline",\n')
    data.chmod(0o644)
    run_sql(
        dsn,
        f"""CREATE EXTENSION file_fdw;
            CREATE SERVER files FOREIGN DATA WRAPPER file_fdw;
            CREATE FOREIGN TABLE people (id int, name text, score numeric) SERVER files
                OPTIONS (filename '{data}', format 'csv', header 'true');""",
    )
    assert run_sql(dsn, "SELECT count(*) FROM people") == [(41,)]
    proc = _cli("export", "people", str(tmp_path / "x.csv"), "--dsn", dsn, "--no-progress")
    _assert_refused(proc, "public.people", "--key")
    expected = psql_csv(dsn, "SELECT * FROM people ORDER BY id")
    result = _export_and_compare(
        dsn, "people", tmp_path / "p.csv", expected, chunk_sizes=(1, 6, 0, None), key="id"
    )
    assert result.key_source == "--key"
    expected = psql_csv(dsn, "SELECT name, id FROM people ORDER BY id", "FORMAT csv, HEADER")
    _export_and_compare(dsn, "people", tmp_path / "h.csv", expected, chunk_sizes=(5,), key="id",
                        columns=["name", "id"], header=True)  # fmt: skip
    with pytest.raises(KeyProblem, match="nullable"):  # score has NULLs
        export_table(dsn, "people", tmp_path / "s.csv", key="score")


def test_objects_that_are_not_relations_are_refused(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    run_sql(dsn, BASE + "CREATE SEQUENCE seq; CREATE TYPE pair AS (a int, b int);")
    for name in ("seq", "base_pkey", "pair"):
        proc = _cli("export", name, str(tmp_path / "x.csv"), "--dsn", dsn, "--no-progress")
        _assert_refused(proc, name)
    assert list(tmp_path.iterdir()) == []


# -- empty and one-row relations of every kind ------------------------------------------------

TINY = """
CREATE TABLE plain (id int PRIMARY KEY, v text);
CREATE TABLE part (id int PRIMARY KEY, v text) PARTITION BY RANGE (id);
CREATE TABLE part_a PARTITION OF part FOR VALUES FROM (0) TO (10);
CREATE TABLE part_d PARTITION OF part DEFAULT;
CREATE TABLE inh (id int PRIMARY KEY, v text);
CREATE TABLE inh_child () INHERITS (inh);
CREATE VIEW vw AS SELECT id, v FROM plain;
"""


@pytest.mark.parametrize("rows", [0, 1], ids=["empty", "one-row"])
def test_empty_and_single_row_relations(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path, rows: int
) -> None:
    run_sql(dsn, TINY)
    if rows:
        run_sql(dsn, """INSERT INTO plain VALUES (7, E'only\\nrow, "q"');
                        INSERT INTO part VALUES (42, 'in the default partition');
                        INSERT INTO inh_child VALUES (3, 'only in the child');""")  # fmt: skip
    run_sql(dsn, "CREATE MATERIALIZED VIEW mv AS SELECT id, v FROM plain; "
                 "CREATE MATERIALIZED VIEW mv_idx AS SELECT id, v FROM plain; "
                 "CREATE UNIQUE INDEX mv_idx_id ON mv_idx (id)")  # fmt: skip
    for name, key in (("plain", None), ("part", None), ("inh", None), ("vw", "id"),
                      ("mv", "id"), ("mv_idx", None)):  # fmt: skip
        for header in (False, True):
            expected = psql_csv(
                dsn, f"SELECT * FROM {name} ORDER BY id", "FORMAT csv" + (", HEADER" * header)
            )
            assert (expected == b"") == (rows == 0 and not header)
            for chunk_rows in (1, None):
                out = tmp_path / f"{name}-{header}-{chunk_rows}.csv"
                result = export_table(dsn, name, out, chunk_rows=chunk_rows, header=header, key=key)
                assert out.read_bytes() == expected, (name, header, chunk_rows)
                assert result.rows == rows
                verified = copystream.verify_file(out)
                assert verified.rows == rows and verified.bytes == len(expected)
                m = _manifest(out)
                assert m["rows"] == rows and m["bytes"] == len(expected)
                assert sum(c["bytes"] for c in m["chunks"]) == len(expected)
                if rows:
                    assert [c["last_key"] for c in m["chunks"] if c["rows"]] == [
                        [{"plain": "7", "part": "42", "inh": "3"}.get(name, "7")]
                    ]
                assert not os.path.exists(str(out) + ".checkpoint.json")
