"""Config files read safely: YAML with the safe loader, ``1e-4`` read as a float, repeated keys refused.

Every config file and ``--set`` value goes through :class:`_Loader`, a ``yaml.SafeLoader`` (no Python
objects are ever built). Its errors become one-line :class:`~difftune.config.checks.ConfigError` messages
that say where the file is wrong.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from difftune.config.checks import ConfigError


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping names the same key twice (PyYAML alone would keep the last value in silence).

    Attributes:
        key: the key's dotted path from the top of the document (``train.max_steps``).
        lines: the 1-based lines of its first and second occurrence.
    """

    def __init__(self, key: str, lines: tuple[int, int]) -> None:
        super().__init__(f"{key} is set twice (lines {lines[0]} and {lines[1]})")
        self.key, self.lines = key, lines


def _refuse_duplicate_keys(root: yaml.Node) -> None:
    """Raise :class:`DuplicateKeyError` for the first mapping under ``root`` that repeats a key."""
    todo: list[tuple[yaml.Node, str]] = [(root, "")]
    seen_nodes: set[int] = set()  # an alias can point back to a node: visit each once
    while todo:
        node, path = todo.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            todo.extend((item, path) for item in node.value)
        if not isinstance(node, yaml.MappingNode):
            continue
        first_line: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                name = f"{path}.{key.value}" if path else key.value
                line = key.start_mark.line + 1
                if (key.tag, key.value) in first_line:
                    raise DuplicateKeyError(name, (first_line[key.tag, key.value], line))
                first_line[key.tag, key.value] = line
                todo.append((value, name))


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` (no dot) as a float, as YAML 1.2 and Python do, and
    refuses a mapping that repeats a key (:class:`DuplicateKeyError`)."""

    def construct_document(self, node: yaml.Node) -> Any:
        _refuse_duplicate_keys(node)
        return super().construct_document(node)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_value(text: str) -> Any:
    """Parse a ``--set`` value with YAML rules (numbers, booleans, null, lists)."""
    return yaml.load(text, Loader=_Loader)


def yaml_problem(err: yaml.YAMLError) -> str:
    """What a YAML error says is wrong, in a few words."""
    return getattr(err, "problem", None) or str(err).splitlines()[0]


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping a YAML config file holds.

    Raises:
        ConfigError: the file is missing, is not valid YAML (with its line and column), sets a key
            twice (with both lines) or does not hold a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; check the path given to --config")
    try:
        raw = yaml.load(p.read_text(), Loader=_Loader) or {}
    except DuplicateKeyError as err:
        fix = "keep one of them" if "." in err.key else "merge them into one section"
        first, second = err.lines
        raise ConfigError(
            f"config file {str(p)!r} sets {err.key} twice (lines {first} and {second}); {fix}"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(
            f"config file {str(p)!r} is not valid YAML{where} ({yaml_problem(err)}); fix the syntax there"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections")
    return raw
