"""Client commands: ``brainscan submit``, ``brainscan status`` (over HTTP) and ``brainscan keys``
(operator commands, straight on the database).

The HTTP commands read the API's address from ``--url`` (default ``http://{host}:{port}`` from the
settings) and the key from ``--key``, else ``BRAINSCAN_API_KEY``, else the file ``var/api-key`` that
``brainscan up`` writes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import typer

from brainscan.settings import get_settings

FINAL = ("succeeded", "failed", "partial")
POLL_S = 1.0
PAGE = 1000

keys_app = typer.Typer(
    help="Create, list and revoke API keys (on the database directly).", no_args_is_help=True
)


# -- HTTP helpers ---------------------------------------------------------------------------------


def _default_url() -> str:
    settings = get_settings()
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://{host}:{settings.port}"


def _resolve_key(key: str | None) -> str:
    if key:
        return key
    if env := os.environ.get("BRAINSCAN_API_KEY"):
        return env.strip()
    path = get_settings().api_key_file
    if path.is_file():
        return path.read_text().strip()
    typer.echo("no API key: pass --key, set BRAINSCAN_API_KEY, or run `brainscan keys create NAME`", err=True)
    raise typer.Exit(2)


def _client(url: str | None, key: str | None, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    import httpx

    return httpx.Client(
        base_url=(url or _default_url()).rstrip("/"),
        headers={"Authorization": f"Bearer {_resolve_key(key)}"},
        timeout=httpx.Timeout(timeout, connect=10.0),
    )


def _check(response) -> Any:  # type: ignore[no-untyped-def]
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        typer.echo(f"error {response.status_code}: {detail}", err=True)
        raise typer.Exit(1)
    return response.json()


def _files_of(paths: list[Path]) -> list[Path]:
    """Files to upload: each file given, and every file under each folder given (sorted)."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")))
        elif path.is_file():
            out.append(path)
        else:
            typer.echo(f"no such file: {path}", err=True)
            raise typer.Exit(2)
    if not out:
        typer.echo("nothing to upload", err=True)
        raise typer.Exit(2)
    return out


def fetch_job(client, job_id: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The whole job: every page of items, concatenated."""
    job = _check(client.get(f"/v1/jobs/{job_id}", params={"offset": 0, "limit": PAGE}))
    items = list(job["items"])
    while job["page"]["next_offset"] is not None:
        page = _check(
            client.get(f"/v1/jobs/{job_id}", params={"offset": job["page"]["next_offset"], "limit": PAGE})
        )
        items.extend(page["items"])
        job["page"] = page["page"]
        if not page["items"]:
            break
    job["items"] = items
    job["page"] = {"offset": 0, "limit": len(items), "returned": len(items), "next_offset": None}
    return job


def _wait(client, job_id: str, total: int, quiet: bool) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TimeElapsedColumn(),
        disable=quiet,
        transient=False,
    ) as progress:
        task = progress.add_task(f"job {job_id[:8]}", total=total or None, failed=0)
        while True:
            job = _check(client.get(f"/v1/jobs/{job_id}", params={"limit": 0}))
            progress.update(
                task, completed=job["done"] + job["failed"], total=job["total"], failed=job["failed"]
            )
            if job["status"] in FINAL:
                return job
            time.sleep(POLL_S)


def print_job(job: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"job {job['id']} - {job['status']}", show_lines=False)
    for column in ("position", "file", "status", "label", "confidence", "error"):
        table.add_column(column, overflow="fold")
    for item in job["items"]:
        confidence = f"{item['confidence']:.3f}" if item["confidence"] is not None else ""
        table.add_row(
            str(item["position"]),
            item["filename"],
            item["status"],
            item["label"] or "",
            confidence,
            item["error"] or "",
            style="red" if item["status"] == "failed" else None,
        )
    console.print(table)
    console.print(
        f"total={job['total']} done={job['done']} failed={job['failed']} pending={job['pending']}",
        markup=False,
    )


def _exit_code(job: dict[str, Any]) -> int:
    return 0 if job["status"] == "succeeded" else 1


# -- commands -------------------------------------------------------------------------------------


def submit(
    paths: list[Path] = typer.Argument(..., help="Scans (JPEG/PNG), archives (zip/tar/tar.gz) or folders."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the results (progress bar), then show them."),
    as_json: bool = typer.Option(False, "--json", help="Print the job as JSON (with --wait: the final job)."),
    callback_url: str | None = typer.Option(None, "--callback-url", help="URL called when the job finishes."),
    url: str | None = typer.Option(None, "--url", help="API base URL [default: http://HOST:PORT]."),
    key: str | None = typer.Option(
        None, "--key", help="API key [default: $BRAINSCAN_API_KEY or var/api-key]."
    ),
) -> None:
    """Upload scans as one job and print its id (or, with --wait, its results)."""
    files = _files_of(paths)
    with _client(url, key, timeout=600.0) as client, ExitStack() as stack:
        # httpx streams file objects in chunks: a big archive is never read whole into memory.
        parts = [("files", (path.name, stack.enter_context(open(path, "rb")))) for path in files]
        data = {"callback_url": callback_url} if callback_url else None
        accepted = _check(client.post("/v1/jobs", files=parts, data=data))
        stack.close()
        job_id = accepted["id"]
        if not wait:
            if as_json:
                typer.echo(json.dumps(accepted, indent=2))
            else:
                typer.echo(job_id)
            return
        if not as_json:
            typer.echo(f"job {job_id}: {accepted['total']} scan(s)", err=True)
        _wait(client, job_id, accepted["total"], quiet=as_json or not sys.stderr.isatty())
        job = fetch_job(client, job_id)
    if as_json:
        typer.echo(json.dumps(job, indent=2))
    else:
        print_job(job)
    raise typer.Exit(_exit_code(job))


def status(
    job_id: str = typer.Argument(..., help="The job id printed by `brainscan submit`."),
    as_json: bool = typer.Option(False, "--json", help="Print the job (with all items) as JSON."),
    url: str | None = typer.Option(None, "--url", help="API base URL [default: http://HOST:PORT]."),
    key: str | None = typer.Option(
        None, "--key", help="API key [default: $BRAINSCAN_API_KEY or var/api-key]."
    ),
) -> None:
    """Show a job's status, counts and per-scan results."""
    with _client(url, key) as client:
        job = fetch_job(client, job_id)
    if as_json:
        typer.echo(json.dumps(job, indent=2))
    else:
        print_job(job)


@keys_app.command("create")
def keys_create(name: str = typer.Argument(..., help="Who or what the key is for.")) -> None:
    """Create a key and print it once (only its hash is stored)."""
    from brainscan.auth import create_key

    with _database() as session:
        key, plaintext = create_key(session, name)
        prefix = key.prefix
    typer.echo(f"created key {prefix}... for {name!r}; it is shown only now:", err=True)
    typer.echo(plaintext)


@keys_app.command("revoke")
def keys_revoke(
    name_or_prefix: str = typer.Argument(..., help="A key's name, or its prefix (bs_xxxxxxxx)."),
) -> None:
    """Revoke every active key with this name or prefix."""
    from brainscan.auth import revoke_key

    with _database() as session:
        revoked = [(k.prefix, k.name) for k in revoke_key(session, name_or_prefix)]
    if not revoked:
        typer.echo(f"no active key named or prefixed {name_or_prefix!r}", err=True)
        raise typer.Exit(1)
    for prefix, name in revoked:
        typer.echo(f"revoked {prefix}... ({name})")


@keys_app.command("list")
def keys_list() -> None:
    """List keys: prefix, name, created, revoked (never the keys themselves)."""
    from brainscan.auth import list_keys
    from brainscan.results import iso

    with _database() as session:
        rows = [(k.prefix, k.name, iso(k.created_at), iso(k.revoked_at)) for k in list_keys(session)]
    for prefix, name, created, revoked in rows:
        state = f"revoked {revoked}" if revoked else "active"
        typer.echo(f"{prefix}...  {name}  created {created}  {state}")


def _database():  # type: ignore[no-untyped-def]
    """A session on the configured database, with a hint when the schema is missing."""
    from contextlib import contextmanager

    from sqlalchemy.exc import OperationalError, ProgrammingError

    from brainscan.db import session_scope

    @contextmanager
    def scope():  # type: ignore[no-untyped-def]
        try:
            with session_scope() as session:
                yield session
        except (OperationalError, ProgrammingError) as exc:
            typer.echo(
                f"database error ({type(exc).__name__}): is the schema there? run `brainscan db upgrade`",
                err=True,
            )
            raise typer.Exit(1) from None

    return scope()


def register(app: typer.Typer) -> None:
    app.command("submit")(submit)
    app.command("status")(status)
    app.add_typer(keys_app, name="keys")
