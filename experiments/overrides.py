"""`key=value` overrides with dotted paths onto nested frozen dataclasses, type-checked.

    apply_overrides(exp, ["steps=200", "mesh.data=2", "optim.lr=1e-3"])

An unknown key fails with the nearest valid names; a value that does not parse as the field's type fails
naming the field and the type. The dataclasses' own validation runs on the result.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing


class OverrideError(ValueError):
    pass


def field_paths(obj, prefix: str = "") -> list[str]:
    """Every settable dotted path of a dataclass instance (nested dataclasses expanded)."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = prefix + f.name
        out.append(path)
        if dataclasses.is_dataclass(value):
            out += field_paths(value, path + ".")
    return out


def _parse(raw: str, tp, path: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and raw.lower() in ("none", "null"):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _parse(raw, a, path)
            except OverrideError as e:
                errors.append(str(e))
        raise OverrideError(f"{path}={raw!r}: expected {tp}")
    if tp is bool:
        low = raw.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise OverrideError(f"{path}={raw!r}: expected a bool (true/false)")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise OverrideError(f"{path}={raw!r}: expected an int") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise OverrideError(f"{path}={raw!r}: expected a float") from None
    if tp is str:
        return raw
    if origin is tuple:
        parts = [p for p in raw.strip("()[]").split(",") if p.strip()]
        args = typing.get_args(tp)
        inner = args[0] if args else str
        # items may be quoted as in Python ("('a', 'b')"); the quotes are not part of a string item
        return tuple(_parse(p.strip().strip("'\"") if inner is str else p.strip(), inner, path) for p in parts)
    raise OverrideError(f"{path}: cannot override a field of type {tp} from the command line")


def _apply(obj, tree: dict, prefix: str, root):
    """Apply a nested {field: raw string | subtree} in one `replace` per dataclass, so validation sees the
    final combination (e.g. n_heads and n_kv_heads changed together)."""
    hints = typing.get_type_hints(type(obj))
    changes = {}
    for name, sub in tree.items():
        full = prefix + name
        if name not in hints:
            target = full if not isinstance(sub, dict) else full + "." + next(iter(sub))
            near = difflib.get_close_matches(target, field_paths(root), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise OverrideError(f"unknown key {target!r}{hint}")
        current = getattr(obj, name)
        if isinstance(sub, dict):
            if current is None or not dataclasses.is_dataclass(current):
                raise OverrideError(f"{full!r} is {'None' if current is None else type(current).__name__}, "
                                    "not a config section")
            changes[name] = _apply(current, sub, full + ".", root)
        elif dataclasses.is_dataclass(current):
            first = dataclasses.fields(current)[0].name
            raise OverrideError(f"{full!r} is a section; set one of its fields, e.g. {full}.{first}=...")
        else:
            changes[name] = _parse(sub, hints[name], full)
    return dataclasses.replace(obj, **changes)


def apply_overrides(cfg, overrides: list[str]):
    """Return `cfg` with every 'dotted.key=value' applied (a later one wins for the same key)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise OverrideError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        node, parts = tree, key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise OverrideError(f"override {key!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = raw.strip()
    return _apply(cfg, tree, "", cfg) if tree else cfg
