"""The ``brainscan`` command. Each group of commands lives in ``brainscan_cli/commands/``.

Heavy imports (TensorFlow, FastAPI, Celery) happen inside the commands, so ``brainscan --help``
and the client commands start fast. An error with a known cause (the API or the database cannot
be reached, a malformed URL) prints one line and a hint (``brainscan_cli/errors.py``);
``brainscan --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

from brainscan_cli import errors
from brainscan_cli.commands import client, models, nightly, service, train


class ExplainingGroup(TyperGroup):
    """Runs a command; turns an unexpected exception into a short message unless ``--debug``."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            if errors.debug or _is_cli_exit(exc):
                raise
            for line in errors.report(exc):
                typer.echo(line, err=True)
            raise typer.Exit(1) from None


def _is_cli_exit(exc: BaseException) -> bool:
    # The command line's own exits (typer.Exit, --help), usage errors and aborts carry their message.
    from typer.exceptions import Abort, Exit, TyperException

    return isinstance(exc, Exit | Abort | TyperException)


app = typer.Typer(
    name="brainscan",
    cls=ExplainingGroup,
    help="Batch scoring of brain MRI scans: serve, submit, train, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="On an error, show the full traceback."),
) -> None:
    errors.debug = debug


for module in (service, client, models, train, nightly):
    module.register(app)


if __name__ == "__main__":
    app()
