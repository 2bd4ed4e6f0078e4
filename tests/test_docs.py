"""The documentation keeps up with the code.

docs/cli.md must mention every command and every option of the click group; docs/python-api.md
every name in ``copystream.__all__``; the README the two commands every reader needs. Every
public name has a docstring of its own. Pure introspection: no server needed.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import click
import pytest

import copystream
from copystream.cli import cli

ROOT = Path(__file__).resolve().parent.parent
CLI_MD = ROOT / "docs" / "cli.md"
API_MD = ROOT / "docs" / "python-api.md"
README = ROOT / "README.md"


def _mentions(text: str, word: str) -> bool:
    """``word`` appears as a whole token (``--force`` does not count inside ``--force-quote``)."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def _commands() -> dict[str, click.Command]:
    assert isinstance(cli, click.Group)
    return dict(cli.commands)


def _options(command: click.Command) -> list[str]:
    ctx = click.Context(command, info_name=command.name)
    names: list[str] = []
    for param in command.get_params(ctx):  # includes --help
        if isinstance(param, click.Option):
            names.extend(param.opts)
            names.extend(param.secondary_opts)
    return names


def test_introspection_sees_the_cli() -> None:
    """Guard the guards: the checks below must have something to check."""
    commands = _commands()
    assert {"export", "verify", "status"} <= set(commands)
    assert {"--dsn", "--key", "--restart", "--retries", "--help"} <= set(
        _options(commands["export"])
    )
    assert "--version" in _options(cli)


def test_mentions_is_whole_token() -> None:
    assert _mentions("use `--force-quote`", "--force-quote")
    assert not _mentions("use `--force-quote`", "--force")
    assert _mentions("`-v`, `--verbose`", "-v")
    assert not _mentions("--verbose", "-v")


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_command_has_a_section(name: str) -> None:
    text = CLI_MD.read_text()
    assert re.search(rf"^#+ copystream {name}\b", text, re.MULTILINE), (
        f"docs/cli.md has no section for `copystream {name}`"
    )


@pytest.mark.parametrize(
    ("command", "option"),
    [("copystream", o) for o in _options(cli)]
    + [(f"copystream {n}", o) for n, c in sorted(_commands().items()) for o in _options(c)],
)
def test_every_option_is_documented(command: str, option: str) -> None:
    assert _mentions(CLI_MD.read_text(), option), f"docs/cli.md does not mention {command} {option}"


def test_every_export_option_has_its_own_section() -> None:
    text = CLI_MD.read_text()
    headings = [h for h in re.findall(r"^###\s+(.+)$", text, re.MULTILINE)]
    missing = [
        o
        for o in _options(_commands()["export"])
        if o not in ("-h", "--help") and not any(_mentions(h, o) for h in headings)
    ]
    assert not missing, f"docs/cli.md has no ### section for export option(s) {missing}"


@pytest.mark.parametrize("name", copystream.__all__)
def test_every_public_name_is_in_the_python_api_doc(name: str) -> None:
    assert _mentions(API_MD.read_text(), name), f"docs/python-api.md does not mention {name}"


@pytest.mark.parametrize("name", copystream.__all__)
def test_every_public_name_has_a_docstring(name: str) -> None:
    obj = getattr(copystream, name)
    if not (inspect.isclass(obj) or inspect.isroutine(obj)):
        assert name == "__version__", f"{name}: unexpected public non-callable"
        return
    # A class's own docstring: dataclasses invent one ("Name(field: type, ...)") when missing.
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    assert doc and doc.strip(), f"copystream.{name} has no docstring"
    assert not doc.startswith(f"{name}("), f"copystream.{name} has only the dataclass signature"
    if inspect.isclass(obj):
        for attr, value in vars(obj).items():
            if attr.startswith("_"):
                continue
            func = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
            if inspect.isroutine(func):
                assert func.__doc__, f"copystream.{name}.{attr} has no docstring"


@pytest.mark.parametrize("command", ["./scripts/demo.sh", "./scripts/test.sh"])
def test_readme_names_the_two_commands(command: str) -> None:
    assert command in README.read_text(), f"README.md does not mention {command}"


@pytest.mark.parametrize("doc", ["docs/cli.md", "docs/python-api.md", "docs/formats.md"])
def test_readme_links_the_docs(doc: str) -> None:
    assert f"]({doc})" in README.read_text(), f"README.md does not link {doc}"


def test_relative_links_resolve() -> None:
    """Every relative link in the docs points at a file that exists."""
    broken = []
    for md in [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()):
            if "://" in target:
                continue
            if not (md.parent / target).exists():
                broken.append(f"{md.relative_to(ROOT)} -> {target}")
    assert not broken, f"broken links: {broken}"


def test_changelog_has_a_dated_entry_for_this_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(
        rf"^## \[{re.escape(copystream.__version__)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", text, re.M
    ), f"CHANGELOG.md has no dated entry for {copystream.__version__}"
