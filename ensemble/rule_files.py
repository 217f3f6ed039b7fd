"""A decision rule's JSON file: where it lives and how it is written and read, for both rules.

Each rule saves its settings (`get_params`) and what it learned as plain JSON, never a pickle;
a path ending in .json is the file itself, a folder gets the rule's own file name inside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conceptclef.core.runfiles import atomic_write_json, read_json


def rule_file(path: str | Path, default_name: str) -> Path:
    """`path` itself when it ends in .json, else `path / default_name`.

    Parameters
    ----------
    path : str or pathlib.Path
        A .json file or a folder.
    default_name : str
        The rule's file name inside a folder.

    Returns
    -------
    pathlib.Path
    """
    path = Path(path)
    return path if path.suffix == ".json" else path / default_name


def save_rule(path: str | Path, default_name: str, kind: str, params: dict[str, Any], learned: dict[str, Any]) -> Path:
    """Write {"kind", "params", **learned} atomically; returns the file written.

    Parameters
    ----------
    path : str or pathlib.Path
        A .json file or a folder (`rule_file`).
    default_name : str
    kind : str
        The rule's kind, recorded for a reader.
    params : dict
        The rule's `get_params()`.
    learned : dict
        Fitted state, JSON-serialisable (floats are written exactly).

    Returns
    -------
    pathlib.Path
    """
    target = rule_file(path, default_name)
    atomic_write_json(target, {"kind": kind, "params": params, **learned})
    return target


def read_rule(path: str | Path, default_name: str) -> dict[str, Any]:
    """The JSON written by `save_rule` (path as in `rule_file`).

    Parameters
    ----------
    path : str or pathlib.Path
    default_name : str

    Returns
    -------
    dict
        "kind", "params" and the learned entries.
    """
    return read_json(rule_file(path, default_name))
