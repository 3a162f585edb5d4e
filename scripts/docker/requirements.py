"""Print the project's runtime requirements from pyproject.toml, one per line, for the image's
dependency layer. ``--variant cuda`` swaps tensorflow-cpu for the ``gpu`` extra (tensorflow[and-cuda]):
the two ship the same ``tensorflow`` package, so an image must hold exactly one of them."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path


def requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    if match is None:
        raise ValueError("requirement without a name in pyproject.toml")
    return match.group(0).lower()


def requirements(pyproject: Path, variant: str) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    dependencies: list[str] = list(project["dependencies"])
    if variant == "cuda":
        tensorflow = {"tensorflow-cpu", "tensorflow"}
        dependencies = [d for d in dependencies if requirement_name(d) not in tensorflow]
        dependencies += project["optional-dependencies"]["gpu"]
    return dependencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variant", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args()
    print("\n".join(requirements(args.pyproject, args.variant)))


if __name__ == "__main__":
    main()
