"""Spec overrides for `kubectl ckpt resume|restart`: `-f override.yaml` (a JSON merge patch of the spec) and
`--set path=value` (one field, list items by index). Pure functions, unit-tested."""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from .builders import merge_patch
from .errors import OperatorError

_SEGMENT = re.compile(r"([^.\[\]]+)((?:\[\d+\])*)")


class OverrideError(OperatorError):
    """An override that cannot be applied (a bad path, a bad file)."""


def load_override_file(text: str) -> dict[str, Any]:
    """An override file: the fields of the spec to change, optionally under a top-level `spec:`."""
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise OverrideError("an override file holds a mapping of spec fields (a JSON merge patch of the spec)")
    spec = data.get("spec", data) if set(data) <= {"spec", "apiVersion", "kind", "metadata"} else data
    if not isinstance(spec, dict):
        raise OverrideError("`spec:` in an override file must be a mapping")
    return spec


def parse_path(path: str) -> list[str | int]:
    """`template.spec.containers[0].env` -> ["template", "spec", "containers", 0, "env"]; `\\.` escapes a dot."""
    parts: list[str | int] = []
    for raw in re.split(r"(?<!\\)\.", path):
        match = _SEGMENT.fullmatch(raw.replace("\\.", "\0"))
        if match is None:
            raise OverrideError(f"--set {path}: cannot read the path segment {raw!r}")
        parts.append(match.group(1).replace("\0", "."))
        parts += [int(index) for index in re.findall(r"\[(\d+)\]", match.group(2))]
    return parts


def set_path(spec: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `spec` with one field set (maps are created on the way; list items must exist)."""
    result = copy.deepcopy(spec)
    parts = parse_path(path)
    node: Any = result
    for index, part in enumerate(parts[:-1]):
        following = parts[index + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise OverrideError(f"--set {path}: there is no item [{part}]")
            node = node[part]
            continue
        if not isinstance(node, dict):
            raise OverrideError(f"--set {path}: {part!r} is inside a value that is not a mapping")
        if part not in node:
            if isinstance(following, int):
                raise OverrideError(f"--set {path}: there is no list {part!r}")
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise OverrideError(f"--set {path}: there is no item [{last}]")
        node[last] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise OverrideError(f"--set {path}: {last!r} is inside a value that is not a mapping")
    return result


def parse_set(assignment: str) -> tuple[str, Any]:
    """`path=value`; the value is read as YAML (numbers, booleans, lists, maps), `'...'` keeps a string."""
    path, sep, raw = assignment.partition("=")
    if not sep or not path:
        raise OverrideError(f"--set {assignment}: expected path=value")
    return path, yaml.safe_load(raw) if raw else ""


def apply_overrides(spec: dict[str, Any], files: list[str], assignments: list[str]) -> tuple[dict[str, Any],
                                                                                              dict[str, Any]]:
    """The spec with every override file merged in (in order), then every --set; and a description of the changes
    (path -> new value) for the job's history."""
    result = copy.deepcopy(spec)
    changes: dict[str, Any] = {}
    for text in files:
        patch = load_override_file(text)
        result = merge_patch(result, patch)
        changes.update({key: value for key, value in patch.items()})
    for assignment in assignments:
        path, value = parse_set(assignment)
        result = set_path(result, path, value)
        changes[path] = value
    return result, changes
