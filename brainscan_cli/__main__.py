"""``python -m brainscan_cli``: the same as the ``brainscan`` command."""

from brainscan_cli.main import app

app()
