"""The session settings that shape COPY's text, pinned for the life of an export.

``TimeZone``, ``DateStyle``, ``IntervalStyle``, ``extra_float_digits``, ``bytea_output``,
``client_encoding`` and ``search_path`` (for ``regclass`` and friends) all change the bytes COPY
produces. They are read once, from the first
connection of a new export (so ``PGTZ``, ``PGDATESTYLE`` and friends apply then), recorded in the
checkpoint, and applied explicitly on every later connection and on resume, whatever the
environment of the resuming process. One file never mixes formats.
"""

from __future__ import annotations

from collections.abc import Mapping

from psycopg import sql

__all__ = ["PINNED_SETTINGS", "apply_settings_query", "read_settings_query"]

#: Names of the settings recorded at the first chunk and re-applied on every connection.
PINNED_SETTINGS: tuple[str, ...] = (
    "TimeZone",
    "DateStyle",
    "IntervalStyle",
    "extra_float_digits",
    "bytea_output",
    "client_encoding",
    "search_path",  # the text of regclass, regtype, regproc... columns names objects by it
)


def read_settings_query() -> sql.Composed:
    """A query returning one row: the current value of each pinned setting, in order."""
    return sql.SQL("SELECT {}").format(
        sql.SQL(", ").join(
            sql.SQL("current_setting({})").format(sql.Literal(name)) for name in PINNED_SETTINGS
        )
    )


def apply_settings_query(settings: Mapping[str, str]) -> sql.Composed:
    """A query that sets each pinned setting (session level) to the recorded value."""
    return sql.SQL("SELECT {}").format(
        sql.SQL(", ").join(
            sql.SQL("set_config({}, {}, false)").format(sql.Literal(name), sql.Literal(value))
            for name, value in settings.items()
        )
    )
