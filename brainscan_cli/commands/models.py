"""``brainscan models list|promote``: the model repository from the operator's side."""

from __future__ import annotations

import typer

from brainscan.modelrepo import ModelNotFound, list_models, promote, promoted, resolve_model
from brainscan.settings import get_settings
from brainscan.variants import choose_variant

models_app = typer.Typer(help="List and promote models in the model repository.", no_args_is_help=True)


@models_app.command("list")
def list_command() -> None:
    """List every model version and mark the one being served."""
    model_dir = get_settings().model_dir
    refs = list_models(model_dir)
    if not refs:
        typer.echo(f"no models in {model_dir}")
        raise typer.Exit(1)
    try:
        serving = resolve_model(model_dir, get_settings().model_name, get_settings().model_version).path
    except ModelNotFound:
        serving = None
    for ref in refs:
        mark = "*" if ref.path == serving else " "
        accuracy = ref.card.metrics.get("val_accuracy")
        extra = f"  val_accuracy={accuracy:.4f}" if isinstance(accuracy, float) else ""
        # The variant this machine would serve, and why (brainscan.variants): int8 or fp32.
        choice = choose_variant(ref.card, ref.path, get_settings().model_format)
        typer.echo(
            f"{mark} {ref.card.name}/{ref.card.version}  {ref.card.architecture}{extra}"
            f"  variant={choice.variant} ({choice.reason})"
        )


@models_app.command("promote")
def promote_command(
    name: str = typer.Argument(..., help="Model name: a folder of the model repository (models/NAME/)."),
    version: str = typer.Argument(..., help="Its version: a subfolder (models/NAME/VERSION/)."),
) -> None:
    """Serve NAME/VERSION from now on; workers switch at their next batch."""
    model_dir = get_settings().model_dir
    try:
        previous = promoted(model_dir)
        ref = promote(model_dir, name, version)
    except ModelNotFound as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    was = f" (was {previous[0]}/{previous[1]})" if previous else ""
    typer.echo(f"promoted {ref.card.name}/{ref.card.version}{was}")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
