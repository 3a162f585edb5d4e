"""Client commands: ``brainscan submit``, ``brainscan status`` (over HTTP) and ``brainscan keys``
(operator commands, straight on the database).

The HTTP commands read the API's address from ``--url``, else the file ``var/api-url`` that
``brainscan up`` writes, else ``http://{host}:{port}`` from the settings; and the key from ``--key``,
else ``BRAINSCAN_API_KEY``, else the file ``var/api-key`` that ``brainscan up`` writes, but only
for the URL that stack serves (``brainscan_cli/stackinfo.py``). A 401 says where the key came from.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from brainscan.settings import get_settings
from brainscan_cli.stackinfo import connectable_url, saved_url, url_file

FINAL = ("succeeded", "failed", "partial")
POLL_S = 1.0
PAGE = 1000

keys_app = typer.Typer(
    help="Create, list and revoke API keys (on the database directly).", no_args_is_help=True
)
jobs_app = typer.Typer(
    help="Operator actions on jobs (on the database and storage directly).", no_args_is_help=True
)


# -- HTTP helpers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """The API a command calls and the key it sends, each with where it came from (for errors)."""

    url: str
    url_source: str
    key: str
    key_source: str


def resolve_target(url: str | None, key: str | None) -> Target:
    settings = get_settings()
    saved = saved_url(settings)
    if url:
        url_source = "--url"
    elif saved:
        url, url_source = saved, f"{url_file(settings)} (written by `brainscan up`)"
    else:
        url, url_source = connectable_url(settings.host, settings.port), "BRAINSCAN_HOST/BRAINSCAN_PORT"
    url = url.rstrip("/")
    if key:
        return Target(url, url_source, key, "--key")
    if env := os.environ.get("BRAINSCAN_API_KEY", "").strip():
        return Target(url, url_source, env, "$BRAINSCAN_API_KEY")
    key_file = settings.api_key_file
    if key_file.is_file():
        # The embedded stack's key belongs to the URL that stack serves, and to no other service.
        if saved is None or saved.rstrip("/") == url:
            return Target(
                url, url_source, key_file.read_text().strip(), f"{key_file} (written by `brainscan up`)"
            )
        typer.echo(
            f"no API key for {url}: {key_file} is the key of the stack at {saved}; "
            "pass --key or set BRAINSCAN_API_KEY",
            err=True,
        )
        raise typer.Exit(2)
    typer.echo("no API key: pass --key, set BRAINSCAN_API_KEY, or run `brainscan keys create NAME`", err=True)
    raise typer.Exit(2)


def _resolve_key(key: str | None, url: str | None = None) -> str:
    return resolve_target(url, key).key


def _client(url: str | None, key: str | None, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    import httpx

    target = resolve_target(url, key)
    return httpx.Client(
        base_url=target.url,
        headers={"Authorization": f"Bearer {target.key}"},
        timeout=httpx.Timeout(timeout, connect=10.0),
        event_hooks={"response": [_on_unauthorized(target)]},
    )


def _on_unauthorized(target: Target):  # type: ignore[no-untyped-def]
    """A 401 names the key's source (flag, environment, file) and the URL's."""

    def hook(response) -> None:  # type: ignore[no-untyped-def]
        if response.status_code != 401:
            return
        response.read()
        typer.echo(f"error 401: {_detail(response)}", err=True)
        shown = f" {target.key[:11]}..." if target.key.startswith("bs_") else ""
        typer.echo(
            f"  the key{shown} came from {target.key_source}; the URL {target.url} from {target.url_source}",
            err=True,
        )
        typer.echo(
            "  hint: use a key of this API's database (`brainscan keys create NAME` there), "
            "with --key or BRAINSCAN_API_KEY",
            err=True,
        )
        raise typer.Exit(1)

    return hook


def _detail(response) -> Any:  # type: ignore[no-untyped-def]
    try:
        return response.json().get("detail", response.text)
    except ValueError:
        return response.text


def _check(response) -> Any:  # type: ignore[no-untyped-def]
    if response.status_code >= 400:
        typer.echo(f"error {response.status_code}: {_detail(response)}", err=True)
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
    job["page"] = {
        **job["page"],
        "offset": 0,
        "limit": len(items),
        "returned": len(items),
        "next_offset": None,
    }
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


FLAG_STYLES = {"uncertain": "yellow", "out_of_scope": "magenta"}
NOTICE = "Research use only - not for diagnostic use."


def counts_line(job: dict[str, Any]) -> str:
    """``total=.. done=.. failed=.. pending=..`` and the per-flag counts (when the job has them)."""
    line = f"total={job['total']} done={job['done']} failed={job['failed']} pending={job['pending']}"
    flags = job.get("flags")
    if flags is not None:
        line += f" uncertain={flags['uncertain']} out_of_scope={flags['out_of_scope']}"
    return line


def flagged_label(item: dict[str, Any]) -> str:
    """The label cell, marked so that a flagged row reads as one without colour: ``OUT OF SCOPE``
    (no label is given) or ``glioma (uncertain)``."""
    flag = item.get("flag")
    if flag == "out_of_scope":
        return "OUT OF SCOPE"
    label = item["label"] or ""
    return f"{label} ({flag})" if flag else label


def print_job(job: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"job {job['id']} - {job['status']}", show_lines=False)
    for column in ("position", "file", "status", "label", "confidence", "note"):
        table.add_column(column, overflow="fold")
    for item in job["items"]:
        flag = item.get("flag")
        confidence = f"{item['confidence']:.3f}" if item["confidence"] is not None else ""
        table.add_row(
            str(item["position"]),
            item["filename"],
            item["status"],
            flagged_label(item),
            confidence,
            item["error"] or item.get("flag_reason") or "",
            style="red" if item["status"] == "failed" else FLAG_STYLES.get(flag or ""),
        )
    console.print(table)
    console.print(counts_line(job), markup=False)
    console.print(NOTICE, markup=False)


def _exit_code(job: dict[str, Any]) -> int:
    return 0 if job["status"] == "succeeded" else 1


# -- commands -------------------------------------------------------------------------------------


def _url_option() -> Any:
    """``--url`` of the HTTP commands (``resolve_target`` says where it falls back to)."""
    return typer.Option(
        None,
        "--url",
        help="API base URL.",
        show_default="var/api-url (from `brainscan up`), else http://BRAINSCAN_HOST:BRAINSCAN_PORT",
    )


def _key_option() -> Any:
    """``--key`` of the HTTP commands."""
    return typer.Option(
        None, "--key", help="API key.", show_default="$BRAINSCAN_API_KEY, else var/api-key for var/api-url"
    )


def submit(
    paths: list[Path] = typer.Argument(..., help="Scans (JPEG/PNG), archives (zip/tar/tar.gz) or folders."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the results (progress bar), then show them."),
    as_json: bool = typer.Option(False, "--json", help="Print the job as JSON (with --wait: the final job)."),
    callback_url: str | None = typer.Option(None, "--callback-url", help="URL called when the job finishes."),
    url: str | None = _url_option(),
    key: str | None = _key_option(),
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
        if accepted.get("enqueued") is False:
            typer.echo(
                f"note: job {job_id} is stored, but the broker did not take it (enqueued: false); "
                f"the reaper queues it once the broker is back (it runs every "
                f"{get_settings().reaper_interval_s} s with `brainscan beat`)",
                err=True,
            )
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
    url: str | None = _url_option(),
    key: str | None = _key_option(),
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


@jobs_app.command("purge")
def jobs_purge(job_id: str = typer.Argument(..., help="The finished job whose scans to remove.")) -> None:
    """Remove a finished job's stored scans and Grad-CAM overlays now (its results stay)."""
    from brainscan.storage import JobNotFinished, ScanStore, purge_job_scans

    store = ScanStore(get_settings().resolved_storage_dir)
    try:
        with _database() as session:
            report = purge_job_scans(session, store, job_id)
    except LookupError:
        typer.echo(f"no job {job_id[:64]!r}", err=True)
        raise typer.Exit(1) from None
    except JobNotFinished:
        typer.echo(f"job {job_id} still has queued or running items: purge it once it finished", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        f"job {job_id}: removed {report.scans} scan file(s), {report.scan_bytes} bytes "
        "(scans another job still holds are kept)"
    )


def _database():  # type: ignore[no-untyped-def]
    """A session on the configured database; a missing schema says to run ``brainscan db upgrade``.

    A database that cannot be reached at all is not a missing schema: that error goes up to the
    command line's handler (brainscan_cli/errors.py), which names the database and what to check.
    """
    from contextlib import contextmanager

    from sqlalchemy.exc import OperationalError, ProgrammingError

    from brainscan.db import session_scope

    @contextmanager
    def scope():  # type: ignore[no-untyped-def]
        try:
            with session_scope() as session:
                yield session
        except (OperationalError, ProgrammingError) as exc:
            if not _schema_missing(exc):
                raise
            typer.echo("the database has no brainscan tables yet: run `brainscan db upgrade`", err=True)
            raise typer.Exit(1) from None

    return scope()


def _schema_missing(exc: Exception) -> bool:
    orig = getattr(exc, "orig", None)
    # PostgreSQL: undefined_table (42P01); SQLite: "no such table".
    return getattr(orig, "sqlstate", None) == "42P01" or "no such table" in str(orig or "")


def register(app: typer.Typer) -> None:
    app.command("submit")(submit)
    app.command("status")(status)
    app.add_typer(keys_app, name="keys")
    app.add_typer(jobs_app, name="jobs")
