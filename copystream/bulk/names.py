"""Table name patterns with ``pg_dump -t`` semantics (pure): what plans, ``--only`` and the
catalog matching of a bulk job all speak."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class _Part:
    regex: str  # a Python regex for the whole part (use with fullmatch)
    literal: str  # the name with quotes removed and unquoted letters folded
    wild: bool  # has an unquoted * or ?


@dataclass(frozen=True)
class NamePattern:
    """A table name pattern with ``pg_dump -t`` semantics.

    ``*`` matches any characters and ``?`` one; a dot separates schema and table; unquoted
    letters fold to lower case; inside double quotes everything is literal (``""`` is a quote).
    Without a schema part, a pattern matches only tables visible on the ``search_path``.
    """

    text: str
    schema: _Part | None
    table: _Part

    @property
    def wild(self) -> bool:
        """Whether the pattern has wildcards (else it names one table)."""
        return self.table.wild or (self.schema is not None and self.schema.wild)

    def matches(self, schema: str, name: str, *, visible: bool = True) -> bool:
        """Whether the relation ``schema.name`` matches (``visible``: on the search_path)."""
        if self.schema is None:
            if not visible:
                return False
        elif re.fullmatch(self.schema.regex, schema, re.DOTALL) is None:
            return False
        return re.fullmatch(self.table.regex, name, re.DOTALL) is not None


def parse_name_pattern(text: str) -> NamePattern:
    """Parse a ``pg_dump -t`` style pattern; ``ValueError`` says what is wrong with it. Pure."""
    parts: list[_Part] = []
    regex: list[str] = []
    literal: list[str] = []
    wild = quoted = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            if quoted and text[i + 1 : i + 2] == '"':
                regex.append(re.escape('"'))
                literal.append('"')
                i += 2
                continue
            quoted = not quoted
        elif quoted:
            regex.append(re.escape(ch))
            literal.append(ch)
        elif ch == ".":
            parts.append(_Part("".join(regex), "".join(literal), wild))
            regex, literal, wild = [], [], False
        elif ch in "*?":
            regex.append(".*" if ch == "*" else ".")
            literal.append(ch)
            wild = True
        elif ch.isspace():
            raise ValueError("unquoted white space (quote names that contain spaces)")
        else:
            folded = ch.lower() if "A" <= ch <= "Z" else ch  # as PostgreSQL folds identifiers
            regex.append(re.escape(folded))
            literal.append(folded)
        i += 1
    if quoted:
        raise ValueError("unterminated double quote")
    parts.append(_Part("".join(regex), "".join(literal), wild))
    if len(parts) > 2:
        raise ValueError("too many dotted names (use schema.table)")
    if any(not p.literal for p in parts):
        raise ValueError("empty schema or table name")
    if len(parts) == 2:
        return NamePattern(text, parts[0], parts[1])
    return NamePattern(text, None, parts[0])
