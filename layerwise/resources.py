"""Where the grammar and the presets live, in a checkout and when installed.

In the repository they sit at the top level (``grammars/``, ``presets/``);
a wheel ships them as package data inside ``layerwise/`` (see
``pyproject.toml``). Both layouts are looked up here and nowhere else.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["grammar_text", "language_reference", "presets_dir", "preset_path", "preset_names"]

_HERE = Path(__file__).resolve().parent


def _data_dir(name: str) -> Path:
    for candidate in (_HERE / name, _HERE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"layerwise is installed without its '{name}' folder "
                            f"(looked in {_HERE} and {_HERE.parent})")


def grammar_text() -> str:
    """The text of ``grammars/layerwise.lark``."""
    return (_data_dir("grammars") / "layerwise.lark").read_text(encoding="utf-8")


def language_reference() -> str:
    """The text of the language reference, ``docs/language.md`` (the project's
    copy of the contract, LANGUAGE.md version 2)."""
    return (_data_dir("docs") / "language.md").read_text(encoding="utf-8")


def presets_dir() -> Path:
    """The folder holding the shipped ``*.lw`` presets."""
    return _data_dir("presets")


def preset_names() -> list[str]:
    """Names of the shipped presets, sorted."""
    return sorted(p.stem for p in presets_dir().glob("*.lw"))


def preset_path(name: str) -> Path | None:
    """The file of preset ``name``, or ``None`` if there is no such preset."""
    path = presets_dir() / f"{name}.lw"
    return path if name.isidentifier() and path.is_file() else None
