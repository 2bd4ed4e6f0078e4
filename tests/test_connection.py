"""Unit tests of copystream.connection: password redaction and user-facing connection errors."""

from __future__ import annotations

import socket
import uuid

import psycopg
import pytest

from copystream.connection import Target, connect, connect_error, describe_target, redact
from copystream.errors import AuthenticationFailed, ConnectionFailed, UsageError
from copystream.testing import EphemeralPostgres

SECRET = "S3cr3t-Pa55"


# -- redact -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        f"host=db password={SECRET} dbname=x",
        f"host=db PASSWORD = {SECRET} dbname=x",
        f"failed: password={SECRET}",
        f"host=db password='a b {SECRET}' dbname=x",
        f"host=db password='it\\'s {SECRET}' dbname=x",
    ],
)
def test_redact_keyword_form(message: str) -> None:
    out = redact(message)
    assert SECRET not in out
    assert "***" in out
    assert out.endswith("dbname=x") or out == "failed: password=***"


def test_redact_uri_form_with_its_secrets() -> None:
    dsn = f"postgresql://alice:{SECRET}@db.example:5433/shop?sslmode=require"
    t = Target(dsn)
    out = redact(f"cannot use {dsn}; bad password {SECRET}", *t.secrets)
    assert SECRET not in out
    assert "db.example" in out  # only the password is hidden, the rest still helps


def test_redact_uri_form_without_secrets() -> None:
    # A URI in a message whose DSN was never parsed (e.g. echoed by a server) is still scrubbed.
    out = redact(f"invalid: postgresql://alice:{SECRET}@db/shop")
    assert SECRET not in out


def test_redact_arbitrary_secret_everywhere() -> None:
    out = redact("token abcd and again abcd, but not abc", "abcd", "")
    assert out == "token *** and again ***, but not abc"


def test_redact_leaves_clean_text_alone() -> None:
    assert redact("cannot connect to db:5432/shop") == "cannot connect to db:5432/shop"


# -- Target -------------------------------------------------------------------------------------


def test_target_parses_both_forms_and_lists_secrets() -> None:
    kv = Target(f"host=db port=5433 dbname=shop user=alice password='{SECRET}'")
    assert kv.params["password"] == SECRET
    assert kv.secrets[0] == SECRET
    uri = Target(f"postgresql://alice:{SECRET}@db:5433/shop")
    assert uri.params["password"] == SECRET
    assert SECRET in uri.secrets
    assert Target("").secrets == []


@pytest.mark.parametrize(
    "conninfo",
    [
        f"host=db password={SECRET} bogus",
        f"host=db password='{SECRET}",
        f"host=db password={SECRET} nosuchoption=1",
        f"postgresql://alice:{SECRET}@[db/shop",
        f"postgresql://alice:{SECRET}@db/shop?bogus=1",
        f"postgresql://alice:{SECRET}%zz@db/shop",  # a '%' in a password that was not encoded
        f"postgresql://alice:{SECRET}%00@db/shop",
        f"postgresql://alice:{SECRET}@[::1]x/shop",
        f"host=db password=my {SECRET} port=5432",  # unquoted space: libpq echoes the rest
        f"host=db password='my {SECRET}' bogus",
        f"postgresql://db/shop?user=alice&password={SECRET}%zz",
    ],
)
def test_invalid_conninfo_is_a_usage_error_without_the_password(conninfo: str) -> None:
    with pytest.raises(UsageError) as ei:
        Target(conninfo)
    msg = str(ei.value)
    assert msg.startswith("invalid connection string: ")
    assert SECRET not in msg
    assert "\n" not in msg  # one line for the one error line of the CLI
    assert isinstance(ei.value.__cause__, psycopg.ProgrammingError)


def test_invalid_conninfo_keeps_useful_detail() -> None:
    with pytest.raises(UsageError) as ei:
        Target(f"host=db password={SECRET} nosuchoption=1")
    assert 'invalid connection option "nosuchoption"' in str(ei.value)


@pytest.mark.parametrize(
    ("conninfo", "expected"),
    [
        (f"host=db port=5433 dbname=shop user=alice password={SECRET}", "db:5433/shop"),
        (f"postgresql://alice:{SECRET}@db.example:6000/sales", "db.example:6000/sales"),
        (f"postgresql://alice:{SECRET}@/sales?host=/run/pg", "/run/pg/sales"),
        (f"hostaddr=10.0.0.1 password={SECRET}", "10.0.0.1/(default database)"),
        (f"password={SECRET}", "(default host)/(default database)"),
    ],
)
def test_describe_never_contains_the_password(conninfo: str, expected: str) -> None:
    t = Target(conninfo)
    assert t.describe() == expected
    assert SECRET not in t.describe()
    assert describe_target(t.params) == expected


# -- connect_error with real failures -----------------------------------------------------------


def test_wrong_password_is_authentication_failed(pg: EphemeralPostgres) -> None:
    user = f"u_{uuid.uuid4().hex[:12]}"
    pg.add_password_user(user, "the-right-one")
    target = Target(pg.dsn_for("postgres", user, SECRET))
    with pytest.raises(psycopg.OperationalError) as raw:
        connect(target)
    err = connect_error(raw.value, target)
    assert isinstance(err, AuthenticationFailed)
    msg = str(err)
    assert msg.startswith(f"authentication failed connecting to {pg.host}:{pg.port}/postgres: ")
    assert f'password authentication failed for user "{user}"' in msg
    assert "connection to server at" not in msg  # libpq's long prefix is dropped
    assert SECRET not in msg
    assert "\n" not in msg
    assert err.exit_code == 2
    # and the right password does connect with the hygiene parameters applied
    ok = Target(pg.dsn_for("postgres", user, "the-right-one"))
    with connect(ok, settings={"TimeZone": "UTC"}) as conn:
        assert conn.autocommit
        assert conn.execute("SHOW application_name").fetchone() == ("copystream",)
        assert conn.execute("SHOW TimeZone").fetchone() == ("UTC",)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_refused_port_is_connection_failed() -> None:
    port = free_port()
    target = Target(
        f"host=127.0.0.1 port={port} dbname=shop user=alice password={SECRET} connect_timeout=5"
    )
    with pytest.raises(psycopg.OperationalError) as raw:
        connect(target)
    err = connect_error(raw.value, target)
    assert type(err) is ConnectionFailed
    msg = str(err)
    assert msg.startswith(f"cannot connect to 127.0.0.1:{port}/shop: ")
    assert msg == (
        f"cannot connect to 127.0.0.1:{port}/shop: Connection refused; "
        "is the server running on that host and accepting TCP/IP connections?"
    )
    assert SECRET not in msg
    assert "\n" not in msg


def test_connect_error_scrubs_a_password_echoed_in_the_error() -> None:
    target = Target(f"host=db user=alice password={SECRET}")
    e = psycopg.OperationalError(
        f'connection to server at "db" failed: bad option near password={SECRET} ({SECRET})'
    )
    err = connect_error(e, target)
    assert isinstance(err, ConnectionFailed)
    assert SECRET not in str(err)
    assert str(err).startswith("cannot connect to db/(default database): ")


def test_connect_error_maps_auth_sqlstate() -> None:
    target = Target("host=db")
    e = psycopg.errors.lookup("28P01")("FATAL: something")
    assert isinstance(connect_error(e, target), AuthenticationFailed)
    e = psycopg.errors.lookup("3D000")('database "nope" does not exist')
    assert type(connect_error(e, target)) is ConnectionFailed
