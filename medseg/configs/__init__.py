"""Recipe configs shipped with medseg: ``--config kits19`` reads ``kits19.toml`` here.

A name without a suffix that is not a file is a recipe (:func:`recipe_path`);
``medseg train --list-configs`` prints them with their first comment line.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def list_recipes() -> list[str]:
    """The shipped recipe names, sorted (``kits19``, ``msd_task04``, ...)."""
    return sorted(p.stem for p in HERE.glob("*.toml"))


def recipe_path(name: str) -> Path | None:
    """The file of the shipped recipe ``name``, or None when there is no such recipe.

    (:meth:`medseg.config.Config.from_file` turns None into an error listing
    :func:`list_recipes`; this module imports nothing of medseg's.)
    """
    path = HERE / f"{name}.toml"
    return path if path.is_file() else None


def describe_recipes() -> str:
    """One line per recipe: its name and the first line of its leading comment."""
    lines = []
    for name in list_recipes():
        first = (HERE / f"{name}.toml").read_text().splitlines()[0].lstrip("# ").strip()
        lines.append(f"{name:12s} {first}")
    return "\n".join(lines)
