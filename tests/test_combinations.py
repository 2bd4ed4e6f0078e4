"""Options built side by side (S3, Parquet, incremental exports, shards) that do not combine
yet: each combination is refused with one error line and exit 2, before anything is read from
PostgreSQL or written anywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import assert_one_error_line, export_cmd, run

#: No server listens here: a refusal must come before any connection.
NOWHERE = "host=127.0.0.1 port=9 dbname=x user=nobody connect_timeout=2"


@pytest.mark.parametrize(
    ("output", "extra", "needle"),
    [
        ("s3://bucket/t.csv", ["--watermark", "at", "--incremental"], "name the previous export"),
        ("s3://bucket/t", ["--format", "parquet"], "Parquet dataset cannot be written to S3"),
    ],
)
def test_combinations_not_built_yet_are_refused_before_anything(
    output: str, extra: list[str], needle: str, tmp_path: Path
) -> None:
    target = output if output.startswith("s3://") else str(tmp_path / output)
    proc = run(export_cmd(NOWHERE, "t", Path(target) if "://" not in target else target, *extra))  # type: ignore[arg-type]
    assert_one_error_line(proc, 2, needle)
    assert list(tmp_path.iterdir()) == []
