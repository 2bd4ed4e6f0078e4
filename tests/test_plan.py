"""Unit tests of planning: key choice and resolution (copystream.table), query composition
(copystream.queries), adaptive chunk sizing (copystream.sizing), introspection (copystream.catalog).

Almost everything here is pure. A few tests run the composed SQL on a real server (``dsn``) to
prove that quoting, row comparison and the parenthesised filter do what the rendered text says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql

from copystream.catalog import introspect
from copystream.errors import KeyProblem, UsageError
from copystream.queries import bound_query, copy_query, last_key_query
from copystream.sizing import (
    FIRST_CHUNK_BYTES,
    MAX_CHUNK_ROWS,
    MIN_CHUNK_ROWS,
    SMALL_TABLE_BYTES,
    TARGET_CHUNK_SECONDS,
    first_chunk_rows,
    many_chunks_warning,
    next_chunk_rows,
)
from copystream.spec import CopyOptions
from copystream.table import (
    IndexInfo,
    ResolvedTable,
    TableFacts,
    choose_key,
    next_null_check,
    resolve,
)

RunSql = Callable[[str, str], list[tuple[Any, ...]]]
PsqlCsv = Callable[..., bytes]

# -- choose_key ---------------------------------------------------------------------------------

PK = IndexInfo("t_pkey", ("id",), primary=True, usable=True)
UQ_CODE = IndexInfo("t_code_key", ("code",), primary=False, usable=True)
UQ_NULLABLE = IndexInfo("t_email_key", ("email",), primary=False, usable=True)
UQ_AB = IndexInfo("t_a_b_key", ("a", "b"), primary=False, usable=True)
COLS = ["id", "code", "email", "a", "b", "note"]


def choose(
    explicit: list[str] | None = None,
    indexes: list[IndexInfo] | None = None,
    not_null: set[str] | None = None,
) -> tuple[tuple[str, ...], str, bool, bool]:
    return choose_key(
        table="public.t",
        explicit=explicit,
        indexes=indexes if indexes is not None else [],
        not_null=not_null if not_null is not None else {"id", "code", "a", "b"},
        existing=COLS,
    )


def test_primary_key_is_preferred_over_unique_indexes() -> None:
    # The unique index comes first in the list: the primary key must still win.
    assert choose(indexes=[UQ_CODE, PK]) == (("id",), "primary key", True, True)


def test_unique_not_null_index_is_the_fallback_and_named() -> None:
    key, source, unique, indexed = choose(indexes=[UQ_NULLABLE, UQ_CODE])
    assert key == ("code",)
    assert source == "unique index t_code_key"
    assert unique and indexed


def test_composite_unique_index_fallback() -> None:
    assert choose(indexes=[UQ_AB]) == (("a", "b"), "unique index t_a_b_key", True, True)


def test_unique_index_over_a_nullable_column_is_not_a_key() -> None:
    with pytest.raises(KeyProblem):
        choose(indexes=[UQ_NULLABLE])


def test_unusable_index_is_not_a_key() -> None:
    partial = IndexInfo("t_code_partial", ("code",), primary=False, usable=False)
    with pytest.raises(KeyProblem):
        choose(indexes=[partial])


def test_no_key_names_the_table_and_suggests_key_option() -> None:
    with pytest.raises(KeyProblem) as ei:
        choose(indexes=[])
    msg = ei.value.worded("cli")  # the command's words; str(e) says key= instead
    assert "public.t" in msg
    assert "--key" in msg
    assert ei.value.exit_code == 2


def test_explicit_key_missing_column() -> None:
    with pytest.raises(KeyProblem) as ei:
        choose(explicit=["id", "nope"], indexes=[PK])
    assert "'nope'" in str(ei.value)
    assert "public.t" in str(ei.value)


def test_explicit_key_duplicate_column() -> None:
    with pytest.raises(KeyProblem) as ei:
        choose(explicit=["a", "a"], indexes=[PK])
    assert "twice" in str(ei.value)


def test_explicit_key_nullable_column_refused() -> None:
    with pytest.raises(KeyProblem) as ei:
        choose(explicit=["id", "email"], indexes=[PK, UQ_NULLABLE])
    msg = str(ei.value)
    assert "'email'" in msg
    assert "nullable" in msg


def test_explicit_non_unique_key_is_allowed_but_not_unique() -> None:
    key, source, unique, indexed = choose(explicit=["a"], indexes=[PK])
    assert key == ("a",)
    assert source == "--key"
    assert unique is False
    assert indexed is False


def test_explicit_key_prefix_of_unique_index_is_indexed_not_unique() -> None:
    assert choose(explicit=["a"], indexes=[UQ_AB]) == (("a",), "--key", False, True)


def test_explicit_key_containing_a_unique_index_is_unique() -> None:
    # (code, a) contains the unique column code: provably unique.
    key, source, unique, indexed = choose(explicit=["code", "a"], indexes=[UQ_CODE])
    assert (key, source, unique) == (("code", "a"), "--key", True)
    assert indexed


def test_explicit_key_over_unusable_index_is_not_unique() -> None:
    bad = IndexInfo("t_code_partial", ("code",), primary=False, usable=False)
    assert choose(explicit=["code"], indexes=[bad]) == (("code",), "--key", False, False)


def test_explicit_key_order_is_kept() -> None:
    key, _, unique, indexed = choose(explicit=["b", "a"], indexes=[UQ_AB])
    assert key == ("b", "a")
    assert unique  # {a, b} is unique whatever the order
    assert indexed  # unique implies it is reported as supported


# -- resolve (pure) -----------------------------------------------------------------------------


def make_facts(**changes: object) -> TableFacts:
    base = TableFacts(
        oid=1,
        schema="public",
        name="t",
        qualified="public.t",
        relkind="r",
        reltuples=1000,
        relbytes=65536,
        can_select=True,
        attributes=(("id", "integer", True), ("code", "text", False), ("note", "text", False)),
        unique_indexes=(PK,),
        index_columns=(("id",),),
        has_children=False,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_resolve_table_with_a_primary_key() -> None:
    facts = make_facts()
    assert next_null_check(facts, key=None, checked={}) is None  # a table declares NOT NULL
    t = resolve(facts)
    assert (t.key, t.key_types, t.key_source, t.key_unique, t.key_indexed) == (
        ("id",),
        ("integer",),
        "primary key",
        True,
        True,
    )
    assert t.columns == ("id", "code", "note")
    assert (t.estimated_rows, t.estimated_bytes) == (1000, 65536)
    assert t.warnings == ()
    assert (t.oid, t.schema, t.name, t.qualified, t.relkind) == (1, "public", "t", "public.t", "r")
    never_analyzed = resolve(make_facts(reltuples=-1), columns=["NOTE", '"id"'], where="id > 0")
    assert never_analyzed.estimated_rows is None
    assert never_analyzed.columns == ("note", "id")
    assert never_analyzed.where == "id > 0"


def test_resolve_view_with_explicit_key_found_null_free() -> None:
    view = make_facts(
        relkind="v",
        qualified="public.v",
        attributes=(("id", "integer", False), ("note", "text", False)),
        unique_indexes=(),
        index_columns=(),
    )
    # The decision asks for exactly one check, then has enough.
    assert next_null_check(view, key=["ID"], checked={}) == ("id",)
    assert next_null_check(view, key=["ID"], checked={("id",): True}) is None
    assert next_null_check(view, key=["ID"], checked={("id",): False}) is None
    t = resolve(view, key=["ID"], null_free_columns={("id",)})
    assert (t.key, t.key_source, t.key_unique, t.key_indexed) == (("id",), "--key", False, False)
    assert t.warnings[0] == (
        "public.v is a view: NOT NULL of key column(s) id cannot be declared, "
        "but no NULL is there now"
    )
    assert any("no index starts with the key (id)" in w for w in t.warnings)
    assert any("not provably unique" in w for w in t.warnings)
    # A NULL found (or no check made): the key is refused as nullable.
    with pytest.raises(KeyProblem) as ei:
        resolve(view, key=["id"])
    assert "nullable" in str(ei.value)


def test_resolve_matview_pages_by_its_unique_index() -> None:
    first = IndexInfo("mv_code_key", ("code",), primary=False, usable=True)
    second = IndexInfo("mv_id_key", ("id",), primary=False, usable=True)
    mv = make_facts(
        relkind="m",
        qualified="public.mv",
        attributes=(("id", "integer", False), ("code", "text", False), ("note", "text", False)),
        unique_indexes=(first, second),
        index_columns=(("code",), ("id",)),
    )
    # One index at a time, in order, until one holds no NULL: no scan more than needed.
    assert next_null_check(mv, key=None, checked={}) == ("code",)
    assert next_null_check(mv, key=None, checked={("code",): False}) == ("id",)
    assert next_null_check(mv, key=None, checked={("code",): True}) is None
    t = resolve(mv, null_free_columns={("id",)})
    assert (t.key, t.key_source, t.key_unique, t.key_indexed) == (
        ("id",),
        "unique index mv_id_key",
        True,
        True,
    )
    assert t.warnings == (
        "public.mv is a materialized view: NOT NULL of the columns of its unique index "
        "mv_id_key cannot be declared, but no NULL is there now",
    )
    with pytest.raises(KeyProblem) as ei:
        resolve(mv)  # NULLs in both
    assert "no primary key and no unique index over NOT NULL columns" in str(ei.value)


def test_resolve_inheritance_children_make_the_key_not_unique() -> None:
    t = resolve(make_facts(has_children=True))
    assert (t.key, t.key_source, t.key_unique, t.key_indexed) == (
        ("id",),
        "primary key",
        False,
        True,
    )
    assert t.warnings == (
        "public.t has inheritance children, which its primary key does not cover: the key is "
        "paged as not unique (rows that tie on it are kept in one chunk)",
    )
    # A partitioned table's partitions are children too, but its primary key covers them.
    p = resolve(make_facts(relkind="p", has_children=True, partition_rows=7, partition_bytes=9))
    assert p.key_unique is True and p.warnings == ()
    assert (p.estimated_rows, p.estimated_bytes) == (7, 9)


def test_resolve_warns_when_no_index_supports_the_key() -> None:
    facts = make_facts(attributes=(("id", "integer", True), ("code", "text", True)))
    t = resolve(facts, key=["code"])
    assert (t.key, t.key_unique, t.key_indexed) == (("code",), False, False)
    assert t.warnings == (
        "no index starts with the key (code) of public.t: every chunk will scan the table; "
        "create one or choose an indexed --key",
        "key (code) of public.t is not provably unique: rows that tie on it are kept in one "
        "chunk, but their order within the tie is not defined",
    )
    # A non-unique index whose first column is the key supports it.
    with_index = dataclasses.replace(facts, index_columns=(("id",), ("code", "id")))
    indexed = resolve(with_index, key=["code"])
    assert indexed.key_indexed is True
    assert not any("no index" in w for w in indexed.warnings)


def test_resolve_refuses_what_cannot_be_exported() -> None:
    with pytest.raises(KeyProblem) as ei:
        resolve(make_facts(), key=["nope"])
    assert "'nope' does not exist in public.t" in str(ei.value)
    with pytest.raises(UsageError) as ui:
        resolve(make_facts(), columns=["nope"])
    assert "column 'nope' does not exist in public.t" in str(ui.value)
    with pytest.raises(UsageError) as pi:
        resolve(make_facts(can_select=False))
    assert "permission denied" in str(pi.value)


# -- query composition ---------------------------------------------------------------------------


def make_plan(**changes: object) -> ResolvedTable:
    base = ResolvedTable(
        oid=1,
        schema="public",
        name="t",
        qualified="public.t",
        relkind="r",
        columns=("id", "note"),
        key=("id",),
        key_types=("integer",),
        key_source="primary key",
        key_unique=True,
        key_indexed=True,
        where=None,
        estimated_rows=None,
        estimated_bytes=None,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def text(q: sql.Composable) -> str:
    return q.as_string(None)


def test_bound_query_single_key() -> None:
    q = text(bound_query(make_plan(), ["41"], 1000))
    assert q == (
        'SELECT "id"::text FROM (SELECT "id" FROM "public"."t" WHERE "id" > \'41\' '
        'ORDER BY "id" OFFSET 999 LIMIT 1) AS bound'
    )


def test_bound_query_first_chunk_has_no_where() -> None:
    q = text(bound_query(make_plan(), None, 1))
    assert "WHERE" not in q
    assert "OFFSET 0 LIMIT 1" in q


def test_composite_key_uses_row_comparison() -> None:
    plan = make_plan(key=("a", "b"), key_types=("integer", "text"))
    q = text(bound_query(plan, ["1", "x"], 10))
    assert "WHERE (\"a\", \"b\") > ('1', 'x')" in q
    assert 'SELECT "a"::text, "b"::text FROM (SELECT "a", "b" FROM' in q
    assert 'ORDER BY "a", "b" OFFSET 9' in q
    c = text(
        copy_query(plan, CopyOptions(), after=["1", "x"], upto=["5", "y"], limit=10, header=False)
    )
    assert "(\"a\", \"b\") > ('1', 'x') AND (\"a\", \"b\") <= ('5', 'y')" in c


def test_last_key_query_orders_descending() -> None:
    plan = make_plan(key=("a", "b"))
    q = text(last_key_query(plan, ["1", "2"]))
    assert q == (
        'SELECT "a"::text, "b"::text FROM (SELECT "a", "b" FROM "public"."t" '
        'WHERE ("a", "b") > (\'1\', \'2\') ORDER BY "a" DESC, "b" DESC LIMIT 1) AS last'
    )
    assert "WHERE" not in text(last_key_query(plan, None))


def test_key_values_are_escaped_literals() -> None:
    evil = "x' OR '1'='1"
    q = text(bound_query(make_plan(key=("k",)), [evil], 5))
    assert "'x'' OR ''1''=''1'" in q
    assert "OR '1'='1'" not in q.replace("''", "")  # no unbalanced quote ends the literal
    q2 = text(bound_query(make_plan(key=("k",)), ["back\\slash'"], 5))
    assert "E'back\\\\slash'''" in q2


def test_identifiers_are_quoted() -> None:
    plan = make_plan(
        schema='My "Schema"',
        name="Order Items",
        columns=('we"ird', "spa ce", "Ünïcødé"),
        key=("Ünïcødé",),
    )
    q = text(copy_query(plan, CopyOptions(), after=["1"], upto=None, limit=None, header=False))
    assert '"My ""Schema"""."Order Items"' in q
    assert 'SELECT "we""ird", "spa ce", "Ünïcødé" FROM' in q
    assert 'WHERE "Ünïcødé" > \'1\' ORDER BY "Ünïcødé"' in q


def test_filter_is_parenthesised_after_key_conditions() -> None:
    plan = make_plan(where="a = 1 OR b = 2")
    q = text(copy_query(plan, CopyOptions(), after=["7"], upto=["9"], limit=2, header=False))
    assert "WHERE \"id\" > '7' AND \"id\" <= '9' AND (a = 1 OR b = 2) ORDER BY" in q
    first = text(bound_query(plan, None, 3))
    assert 'FROM "public"."t" WHERE (a = 1 OR b = 2) ORDER BY' in first


def test_limit_only_when_key_is_unique() -> None:
    opts = CopyOptions()
    unique = text(copy_query(make_plan(), opts, after=None, upto=["9"], limit=500, header=False))
    assert unique.endswith('ORDER BY "id" LIMIT 500) TO STDOUT (FORMAT csv)')
    tied = make_plan(key_unique=False)
    q = text(copy_query(tied, opts, after=None, upto=["9"], limit=500, header=False))
    assert "LIMIT" not in q
    assert q.endswith('ORDER BY "id") TO STDOUT (FORMAT csv)')
    no_limit = text(copy_query(make_plan(), opts, after=None, upto=None, limit=None, header=False))
    assert "LIMIT" not in no_limit


def test_header_only_when_asked() -> None:
    opts = CopyOptions(header=True)
    q1 = text(copy_query(make_plan(), opts, after=None, upto=None, limit=None, header=True))
    assert q1.endswith("TO STDOUT (FORMAT csv, HEADER true)")
    # header=True in the options does not leak into a later chunk asked without a header
    q2 = text(copy_query(make_plan(), opts, after=["1"], upto=None, limit=None, header=False))
    assert "HEADER" not in q2


def test_copy_options_compose_quotes_values_and_columns() -> None:
    opts = CopyOptions(
        format="text",
        delimiter="|",
        null="\\N",
        quote="'",
        escape="\\",
        force_quote=("a b", 'q"'),
        encoding="LATIN1",
    )
    assert text(opts.compose(header=False)) == (
        "(FORMAT text, DELIMITER '|', NULL  E'\\\\N', QUOTE '''', ESCAPE  E'\\\\', "
        'ENCODING \'LATIN1\', FORCE_QUOTE ("a b", "q"""))'
    )
    assert text(CopyOptions(force_quote=True).compose(header=True)) == (
        "(FORMAT csv, HEADER true, FORCE_QUOTE *)"
    )
    assert text(CopyOptions().compose(header=False)) == "(FORMAT csv)"


def test_copy_options_unknown_format_is_a_usage_error() -> None:
    with pytest.raises(UsageError) as ei:
        CopyOptions(format="binary; DROP TABLE t").compose(header=False)
    assert "'csv' or 'text'" in str(ei.value)


def test_copy_options_to_dict_is_json_safe() -> None:
    d = CopyOptions(force_quote=("a",), delimiter=";").to_dict()
    assert d["force_quote"] == ["a"]
    assert d["delimiter"] == ";"
    assert CopyOptions(force_quote=True).to_dict()["force_quote"] is True


# -- the composed SQL on a real server ----------------------------------------------------------


def _copy_out(conn: psycopg.Connection[tuple[object, ...]], q: sql.Composed) -> bytes:
    out = b""
    with conn.cursor() as cur, cur.copy(q) as copy:
        for block in copy:
            out += bytes(block)
    return out


def test_composite_key_paging_and_hostile_values_on_server(dsn: str, run_sql: RunSql) -> None:
    table = '"Odd ""T"""'
    run_sql(
        dsn,
        f"CREATE TABLE {table} (k text NOT NULL, n int NOT NULL, v text, PRIMARY KEY (k, n));"
        f"INSERT INTO {table} VALUES ('a', 1, 'r1'), ('a', 2, 'r2'),"
        "  ($$x' OR '1'='1$$, 1, 'r3'), ($$x' OR '1'='1$$, 2, 'r4'),"
        "  ($$b\\q'$$, 1, 'r5'), ('z', 1, 'r6')",
    )
    plan = make_plan(
        schema="public", name='Odd "T"', columns=("v",), key=("k", "n"), key_types=("text", "int")
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        # bound of 2 rows after ('a', 1): ordered keys are (a,1) (a,2) (b\q',1) (x'..,1) ...
        bound = conn.execute(bound_query(plan, ["a", "1"], 2)).fetchall()
        assert bound == [("b\\q'", "1")]
        q = copy_query(
            plan, CopyOptions(), after=["a", "1"], upto=list(bound[0]), limit=2, header=False
        )
        assert _copy_out(conn, q) == b"r2\nr5\n"
        # the injection-looking key value is only a value: exactly the rows after it come back
        q = copy_query(
            plan, CopyOptions(), after=["x' OR '1'='1", "1"], upto=None, limit=None, header=False
        )
        assert _copy_out(conn, q) == b"r4\nr6\n"
        last = conn.execute(last_key_query(plan, ["a", "2"])).fetchall()
        assert last == [("z", "1")]
        assert conn.execute(bound_query(plan, ["z", "1"], 1)).fetchall() == []


def test_filter_with_or_cannot_widen_the_key_range_on_server(dsn: str, run_sql: RunSql) -> None:
    run_sql(
        dsn,
        "CREATE TABLE t (id int PRIMARY KEY, note text);"
        "INSERT INTO t SELECT g, 'n' || g FROM generate_series(1, 10) g",
    )
    plan = make_plan(where="true OR id < 0")
    with psycopg.connect(dsn, autocommit=True) as conn:
        q = copy_query(
            plan, CopyOptions(header=True), after=["7"], upto=["9"], limit=5, header=True
        )
        assert _copy_out(conn, q) == b"id,note\n8,n8\n9,n9\n"


# -- chunk sizing --------------------------------------------------------------------------------


def test_many_chunks_warning() -> None:
    assert many_chunks_warning(10_000_000, None) is None  # adaptive: never
    assert many_chunks_warning(10_000_000, 0) is None  # one COPY
    assert many_chunks_warning(None, 10) is None  # no estimate
    assert many_chunks_warning(10_000_000, 1_000) is None  # exactly 10,000 chunks
    w = many_chunks_warning(10_001_000, 1_000)
    assert w is not None and "about 10,001 chunks" in w and "omit --chunk-rows" in w
    assert many_chunks_warning(20_002_000, 1_000, ranges=2) == (
        "--chunk-rows 1,000 makes about 10,001 chunks per range; every checkpoint records all "
        "chunks so far, so writing them grows with each chunk: omit --chunk-rows (chunks adapt "
        "to ~2 s each) or give a larger number"
    )
    assert many_chunks_warning(20_002_000, 1_000, ranges=3) is None


def test_first_chunk_without_estimates() -> None:
    assert first_chunk_rows(None, None) == 100_000
    assert first_chunk_rows(1000, None) == 100_000
    assert first_chunk_rows(0, 10**9) == 100_000


def test_small_table_is_one_chunk() -> None:
    # 0 = single-COPY mode: the whole table in one COPY
    assert first_chunk_rows(50_000, SMALL_TABLE_BYTES - 1) == 0
    assert first_chunk_rows(1, 0) == 0
    # at the threshold: chunks of FIRST_CHUNK_BYTES (4 x 50,000 rows, up to float rounding)
    assert 199_990 <= first_chunk_rows(50_000, SMALL_TABLE_BYTES) <= 200_000
    assert next_chunk_rows(0, 50_000, 0.5) == 0  # single-COPY mode stays single-COPY


def test_first_chunk_targets_bytes_and_is_clamped() -> None:
    # 1 KiB rows: 32 MiB / 1 KiB
    assert first_chunk_rows(1_000_000, 1_000_000 * 1024) == FIRST_CHUNK_BYTES // 1024
    assert first_chunk_rows(1_000, 10**12) == MIN_CHUNK_ROWS  # very wide rows
    assert first_chunk_rows(10**10, 10**9) == MAX_CHUNK_ROWS  # tiny rows (width floored at 1)


def test_next_chunk_aims_at_target_duration() -> None:
    assert next_chunk_rows(100_000, 100_000, TARGET_CHUNK_SECONDS) == 100_000
    assert next_chunk_rows(100_000, 100_000, TARGET_CHUNK_SECONDS / 2) == 200_000
    assert next_chunk_rows(100_000, 100_000, TARGET_CHUNK_SECONDS * 2) == 50_000


def test_next_chunk_changes_at_most_4x_per_step() -> None:
    assert next_chunk_rows(100_000, 100_000, 0.0001) == 400_000
    assert next_chunk_rows(100_000, 100_000, 1000.0) == 25_000


def test_next_chunk_stays_within_bounds() -> None:
    assert next_chunk_rows(MIN_CHUNK_ROWS, MIN_CHUNK_ROWS, 1000.0) == MIN_CHUNK_ROWS
    assert next_chunk_rows(MAX_CHUNK_ROWS, MAX_CHUNK_ROWS, 0.001) == MAX_CHUNK_ROWS


def test_next_chunk_keeps_size_without_a_measurement() -> None:
    assert next_chunk_rows(12_345, 0, 1.0) == 12_345
    assert next_chunk_rows(12_345, 100, 0.0) == 12_345


@pytest.mark.parametrize("current", [MIN_CHUNK_ROWS, 7_777, 100_000, MAX_CHUNK_ROWS])
@pytest.mark.parametrize("seconds", [1e-6, 0.01, 0.5, 2.0, 3.0, 60.0, 1e6])
@pytest.mark.parametrize("fraction", [0.001, 0.5, 1.0])
def test_next_chunk_invariants(current: int, seconds: float, fraction: float) -> None:
    rows = max(1, int(current * fraction))
    n = next_chunk_rows(current, rows, seconds)
    assert MIN_CHUNK_ROWS <= n <= MAX_CHUNK_ROWS
    assert current // 4 <= n <= current * 4


def test_composed_copy_matches_psql_bytes(dsn: str, run_sql: RunSql, psql_csv: PsqlCsv) -> None:
    run_sql(
        dsn,
        'CREATE TABLE t (id int PRIMARY KEY, "a b" text, n numeric);'
        """INSERT INTO t VALUES (1, 'x;y', 0.1), (2, NULL, NULL), (3, 'q"uote', 3)""",
    )
    plan = make_plan(columns=("id", "a b", "n"))
    opts = CopyOptions(header=True, delimiter=";", force_quote=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        got = _copy_out(
            conn, copy_query(plan, opts, after=None, upto=None, limit=None, header=True)
        )
    want = psql_csv(
        dsn,
        'SELECT id, "a b", n FROM t ORDER BY id',
        "FORMAT csv, HEADER true, DELIMITER ';', FORCE_QUOTE *",
    )
    assert got == want
    assert got.startswith(b'id;a b;n\n"1";"x;y";"0.1"\n')


# -- index detection by introspect --------------------------------------------------------------


def test_introspect_key_sources_and_index_detection(dsn: str, run_sql: RunSql) -> None:
    run_sql(
        dsn,
        "CREATE TABLE u (code text NOT NULL UNIQUE, email text UNIQUE, x int);"
        "CREATE TABLE g (a int NOT NULL, b int NOT NULL, v text);"
        "CREATE INDEX g_a_idx ON g (a);",
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        u = introspect(conn, "u")
        assert (u.key, u.key_source, u.key_unique, u.key_indexed) == (
            ("code",),
            "unique index u_code_key",
            True,
            True,
        )
        assert u.warnings == ()
        ga = introspect(conn, "g", key=["a"])
        assert (ga.key, ga.key_source, ga.key_unique, ga.key_indexed) == (
            ("a",),
            "--key",
            False,
            True,
        )
        assert any("not provably unique" in w for w in ga.warnings)
        assert not any("no index" in w for w in ga.warnings)
        gb = introspect(conn, "g", key=["b"])
        assert gb.key_indexed is False
        assert any("no index starts with the key (b)" in w for w in gb.warnings)
        with pytest.raises(KeyProblem) as ei:
            introspect(conn, "g")
        assert "public.g" in str(ei.value) and "--key" in ei.value.worded("cli")


def test_one_copy_is_a_fresh_small_table_that_continues_no_other_export_pure() -> None:
    """The one decision behind a small export's single COPY, the pipeline's and a bulk worker's
    direct path alike: never an increment (appended, after ``since``, by a watermark), never a
    table with something on disk or one too large or of unknown size."""
    from copystream.pipeline import one_copy
    from copystream.spec import ExportSpec, RunOptions
    from copystream.state import Fresh, Occupied

    small = make_plan(estimated_rows=200, estimated_bytes=24_576)
    spec, run = ExportSpec("public.t"), RunOptions()
    assert one_copy(small, spec, run, Fresh())
    assert not one_copy(small, spec, run, Occupied())
    assert not one_copy(make_plan(), spec, run, Fresh())  # never analyzed: size unknown
    assert not one_copy(small, spec, RunOptions(chunk_rows=50), Fresh())
    assert not one_copy(small, spec, RunOptions(incremental=True), Fresh())
    assert not one_copy(small, spec, RunOptions(since="t.csv.manifest.json"), Fresh())
    assert not one_copy(small, dataclasses.replace(spec, watermark="updated_at"), run, Fresh())
