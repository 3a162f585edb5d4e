"""Where the CLI sends a request and with which key (``brainscan_cli.commands.client.resolve_target``),
how its errors read, and that every command's help is complete."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import typer
from typer.testing import CliRunner

from brainscan_cli import errors
from brainscan_cli.commands.client import resolve_target
from brainscan_cli.main import app
from brainscan_cli.stackinfo import write_url
from tests.support.environment import clear_settings_cache


@pytest.fixture
def var_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("BRAINSCAN_VAR_DIR", str(tmp_path))
    monkeypatch.setenv("BRAINSCAN_HOST", "127.0.0.1")
    monkeypatch.setenv("BRAINSCAN_PORT", "8000")
    monkeypatch.delenv("BRAINSCAN_API_KEY", raising=False)
    clear_settings_cache()
    yield tmp_path
    clear_settings_cache()


def up_wrote(var_dir: Path, url: str, key: str) -> None:
    from brainscan.settings import get_settings

    (var_dir / "api-key").write_text(key + "\n")
    write_url(get_settings(), url)


def test_the_saved_url_and_key_of_brainscan_up_are_used_together(var_dir: Path) -> None:
    up_wrote(var_dir, "http://127.0.0.1:8399", "bs_embedded")
    target = resolve_target(None, None)
    assert (target.url, target.key) == ("http://127.0.0.1:8399", "bs_embedded")
    assert "api-url" in target.url_source and "api-key" in target.key_source


def test_flags_and_environment_come_first_and_are_named(
    var_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    up_wrote(var_dir, "http://127.0.0.1:8399", "bs_embedded")
    flagged = resolve_target("http://api.example:9000/", "bs_flag")
    assert (flagged.url, flagged.key) == ("http://api.example:9000", "bs_flag")
    assert resolve_target(None, "bs_flag").key_source == "--key"
    monkeypatch.setenv("BRAINSCAN_API_KEY", "bs_env")
    target = resolve_target("http://api.example:9000", None)
    assert (target.key, target.key_source, target.url_source) == ("bs_env", "$BRAINSCAN_API_KEY", "--url")


def test_the_embedded_key_is_never_sent_to_another_url(
    var_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    up_wrote(var_dir, "http://127.0.0.1:8399", "bs_embedded")
    with pytest.raises(typer.Exit) as exited:
        resolve_target("http://api.example:9000", None)
    assert exited.value.exit_code == 2
    assert "is the key of the stack at http://127.0.0.1:8399" in capsys.readouterr().err


def test_without_a_saved_url_the_settings_address_is_used(var_dir: Path) -> None:
    (var_dir / "api-key").write_text("bs_old\n")  # a key file from before URLs were saved
    target = resolve_target(None, None)
    assert (target.url, target.key, target.url_source) == (
        "http://127.0.0.1:8000",
        "bs_old",
        "BRAINSCAN_HOST/BRAINSCAN_PORT",
    )


def test_connection_errors_read_as_one_line_and_a_hint() -> None:
    request = httpx.Request("GET", "http://127.0.0.1:8399/v1/jobs/x?limit=0")
    lines = errors.report(httpx.ConnectError("[Errno 111] Connection refused", request=request))
    assert lines[0] == "error: cannot reach the API at http://127.0.0.1:8399: [Errno 111] Connection refused"
    assert lines[1].startswith("  hint: is it running?") and "--debug" in lines[1]
    assert len(lines) == 2


def test_every_command_option_and_argument_has_help() -> None:
    missing = []

    def walk(command: object, path: list[str]) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])
        if not getattr(command, "commands", None):
            missing.extend(
                " ".join([*path, str(p.name)])
                for p in command.params
                if not getattr(p, "help", None)  # type: ignore[attr-defined]
            )

    walk(typer.main.get_command(app), [])
    assert missing == []


def test_help_shows_the_defaults_rich_markup_used_to_eat() -> None:
    result = CliRunner().invoke(app, ["submit", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "[default: (var/api-url (from `brainscan up`)" in result.output
    assert "API base URL ." not in result.output
