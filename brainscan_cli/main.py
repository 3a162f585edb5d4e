"""The ``brainscan`` command. Each group of commands lives in ``brainscan_cli/commands/``.

Heavy imports (TensorFlow, FastAPI, Celery) happen inside the commands, so ``brainscan --help``
and the client commands start fast.
"""

from __future__ import annotations

import typer

from brainscan_cli.commands import client, models, nightly, service, train

app = typer.Typer(
    name="brainscan",
    help="Batch scoring of brain MRI scans: serve, submit, train, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

for module in (service, client, models, train, nightly):
    module.register(app)


if __name__ == "__main__":
    app()
