"""What an export is (:class:`ExportSpec`) and how it runs (:class:`RunOptions`).

Every option of an export is declared once, here: its field, default, check and help text. The
library's :func:`copystream.export_table`, the ``copystream export`` flags and the keys of a bulk
plan are all derived from these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from .errors import UsageError

__all__ = ["CopyOptions"]


@dataclass(frozen=True)
class CopyOptions:
    """How COPY formats the rows. PostgreSQL does all formatting; these are its COPY options.

    The defaults give PostgreSQL's plain CSV (``FORMAT csv``).
    """

    format: str = "csv"
    header: bool = False
    delimiter: str | None = None
    null: str | None = None
    quote: str | None = None
    escape: str | None = None
    force_quote: tuple[str, ...] | bool = ()
    encoding: str | None = None

    def to_dict(self) -> dict[str, object]:
        """A JSON-safe form, recorded in the checkpoint and manifest."""
        fq: object = (
            self.force_quote if isinstance(self.force_quote, bool) else list(self.force_quote)
        )
        return {
            "format": self.format,
            "header": self.header,
            "delimiter": self.delimiter,
            "null": self.null,
            "quote": self.quote,
            "escape": self.escape,
            "force_quote": fq,
            "encoding": self.encoding,
        }

    def compose(self, *, header: bool) -> sql.Composed:
        """The parenthesised option list of a COPY statement.

        ``header`` is passed separately because only the first chunk of a file carries it.
        """
        opts: list[sql.Composable] = [
            sql.SQL("FORMAT {}").format(sql.SQL(_format_word(self.format)))
        ]
        if header:
            opts.append(sql.SQL("HEADER true"))
        for word, value in (
            ("DELIMITER", self.delimiter),
            ("NULL", self.null),
            ("QUOTE", self.quote),
            ("ESCAPE", self.escape),
            ("ENCODING", self.encoding),
        ):
            if value is not None:
                opts.append(sql.SQL(word + " {}").format(sql.Literal(value)))
        if self.force_quote is True:
            opts.append(sql.SQL("FORCE_QUOTE *"))
        elif self.force_quote:
            opts.append(
                sql.SQL("FORCE_QUOTE ({})").format(
                    sql.SQL(", ").join(sql.Identifier(c) for c in self.force_quote)
                )
            )
        return sql.SQL("({})").format(sql.SQL(", ").join(opts))


def _format_word(fmt: str) -> str:
    words = {"csv": "csv", "text": "text"}
    if fmt not in words:
        raise UsageError(f"unknown format {fmt!r}: use 'csv' or 'text'")
    return words[fmt]
