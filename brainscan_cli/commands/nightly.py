"""``brainscan nightly``: the nightly inbox scan (and optional re-scoring), on demand."""

from __future__ import annotations

import typer

from brainscan.settings import get_settings


def nightly(
    now: bool = typer.Option(False, "--now", help="Run it now, in this process (no beat needed)."),
    rescore_days: int = typer.Option(
        None,
        min=0,
        help="Re-score the last N days' results of other models (default BRAINSCAN_NIGHTLY_RESCORE_DAYS).",
    ),
) -> None:
    """Score every file in the inbox as one job each, then move it to done/ or failed/."""
    settings = get_settings()
    if not now:
        typer.echo(
            f"schedule  {settings.nightly_cron} (UTC, BRAINSCAN_NIGHTLY_CRON; run by `brainscan beat`)"
        )
        typer.echo(f"inbox     {settings.resolved_nightly_inbox_dir}")
        typer.echo(
            f"re-score  last {settings.nightly_rescore_days} day(s)"
            if settings.nightly_rescore_days
            else "re-score  off"
        )
        typer.echo("run it now with `brainscan nightly --now`")
        return
    from worker.nightly import run_nightly

    report = run_nightly(settings, rescore_days)
    for line in report.lines():
        typer.echo(line)
    if report.skipped_settling:
        # Right after copying files in, nothing happens until they have settled: say so.
        typer.echo(
            f"{len(report.skipped_settling)} file(s) skipped: modified less than "
            f"{settings.nightly_settle_s} s ago (BRAINSCAN_NIGHTLY_SETTLE_S), so possibly still being "
            "copied; run again once they have settled"
        )


def register(app: typer.Typer) -> None:
    app.command("nightly")(nightly)
