"""Process commands: ``brainscan up | api | worker | beat | db upgrade``.

Each process is configured only by ``BRAINSCAN_*`` environment variables, so the same commands run
the embedded stack, docker-compose services, or hand-started processes on several machines.
"""

from __future__ import annotations

import os

import typer

from brainscan.queue_contract import WORKER_QUEUES
from brainscan.settings import get_settings

db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Create or migrate the database schema to REVISION (default: the newest)."""
    from brainscan.migrate import current, upgrade
    from brainscan_cli.embedded import _display_url

    url = get_settings().resolved_database_url
    upgrade(url, revision)
    typer.echo(f"{_display_url(url)} at revision {current(url)}")


@db_app.command("current")
def db_current() -> None:
    """Print the schema revision the database is at."""
    from brainscan.migrate import current

    typer.echo(current(get_settings().resolved_database_url) or "empty (run `brainscan db upgrade`)")


def api(
    host: str = typer.Option(None, help="Bind address (default BRAINSCAN_HOST)."),
    port: int = typer.Option(None, help="Port (default BRAINSCAN_PORT)."),
    workers: int = typer.Option(1, min=1, help="uvicorn worker processes."),
) -> None:
    """Run the HTTP API (uvicorn)."""
    from brainscan.logs import start_process_logging, uvicorn_log_config

    settings = get_settings()
    start_process_logging(settings.log_format)
    import uvicorn

    uvicorn.run(
        "api.app:app",
        host=host or settings.host,
        port=port or settings.port,
        workers=workers,
        proxy_headers=True,
        log_level="info",
        access_log=False,  # URLs carry job ids only, but access logs add nothing a client needs
        # An idle kept-alive connection is closed after 5 s; a request's headers may not grow past
        # 16 KiB unfinished. (Upload bodies have their own deadlines: api/upload.py.)
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=16 * 1024,
        log_config=uvicorn_log_config(settings.log_format, settings.log_level),
    )


def worker(
    concurrency: int = typer.Option(
        1, min=1, help="Scoring processes. 1 = solo pool (one model, this process); N = prefork children."
    ),
    queues: str = typer.Option(
        # Scoring, then Grad-CAM + nightly, then webhooks.
        ",".join(WORKER_QUEUES),
        "--queues",
        "-Q",
        help="Comma-separated queues to consume.",
    ),
    loglevel: str = typer.Option("INFO", help="Celery log level."),
    hostname: str = typer.Option("", help="Celery node name (default brainscan-<pid>@<host>)."),
) -> None:
    """Run a Celery worker: loads the model once per process, warms it up, then scores in batches."""
    from brainscan.logs import start_process_logging

    start_process_logging(get_settings().log_format)
    from worker.celery import app

    argv = [
        "--quiet",  # no banner: worker/celery.py logs one start-up line instead
        "worker",
        f"--loglevel={loglevel}",
        f"--queues={queues}",
        f"--hostname={hostname or f'brainscan-{os.getpid()}@%h'}",
        "--without-gossip",  # nothing here uses gossip/mingle; they only slow start-up
        "--without-mingle",
    ]
    if concurrency == 1:
        argv += ["--pool=solo"]
    else:
        argv += ["--pool=prefork", f"--concurrency={concurrency}"]
    app.worker_main(argv)


def beat(loglevel: str = typer.Option("INFO", help="Celery log level.")) -> None:
    """Run Celery beat: the reaper every ``reaper_interval_s``. Run one per deployment."""
    from brainscan.logs import start_process_logging

    settings = get_settings()
    start_process_logging(settings.log_format)
    from worker.celery import app

    settings.var_dir.mkdir(parents=True, exist_ok=True)
    schedule = settings.var_dir / "celerybeat-schedule"
    app.start(["--quiet", "beat", f"--loglevel={loglevel}", f"--schedule={schedule}"])


def up(
    workers: int = typer.Option(
        0,
        min=0,
        help="Worker processes to start; 0 = one per core, up to 4. Unless BRAINSCAN_TF_THREADS is set, "
        "several workers share the cores equally.",
    ),
) -> None:
    """Start the embedded stack: Redis, SQLite, API, worker(s), beat. Ctrl-C stops everything."""
    from brainscan_cli.embedded import (
        StackError,
        default_workers,
        run_forever,
        start_stack,
        wait_for_workers,
        worker_threads,
    )

    settings = get_settings()
    workers = workers or default_workers()
    threads = worker_threads(settings.tf_threads, workers)
    typer.echo(f"workers   {workers} x {threads or 'all'} thread(s)")
    try:
        stack = start_stack(settings, workers=workers, echo=typer.echo)
    except StackError as exc:
        typer.echo(f"brainscan up: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"API       {stack.url}   (docs: {stack.url}/docs)")
    typer.echo(f"API key   {stack.key}   (also in {settings.api_key_file})")
    typer.echo("waiting for the workers to load the model ...")
    try:
        wait_for_workers(stack, workers)
    except StackError as exc:
        typer.echo(f"brainscan up: {exc}", err=True)
        stack.stop()
        raise typer.Exit(1) from None
    typer.echo("ready. Try:")
    auth = f'-H "Authorization: Bearer $(cat {settings.api_key_file})"'
    typer.echo(f"  curl {auth} -F files=@scan.jpg {stack.url}/v1/jobs")
    typer.echo("Ctrl-C stops everything.")
    raise typer.Exit(run_forever(stack, echo=typer.echo))


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
    app.command("up")(up)
    app.command("api")(api)
    app.command("worker")(worker)
    app.command("beat")(beat)
