"""Typed job configuration: strict pydantic models, YAML files and ``--set a.b=c`` overrides.

Every job has one frozen config model built from small sub-configs. Unknown keys are
rejected, choices are ``Literal`` and bounds are ``Field(gt=...)``. :func:`run_job` is the
one command-line front end every ``jobs/`` entrypoint uses::

    python -m jobs.train --config configs/train.yaml --set train.max_steps=10 --dry-run

A bad config exits with code 2 and a message naming the field, the bad value and what is
allowed, before any cluster work starts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from embedforge.errors import ConfigError, EmbedforgeError

log = logging.getLogger(__name__)

C = TypeVar("C", bound="StrictModel")

# Top-level fields that say where and how a stage runs, not what it computes.
UNHASHED_FIELDS = ("output", "ray", "overwrite")


class StrictModel(BaseModel):
    """Base of every config: frozen, unknown keys rejected, documented fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    def config_hash(self) -> str:
        """A short stable hash of the resolved config (keys sorted), for output keys."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def content_hash(self) -> str:
        """Hash of what determines a stage's output: the config without ``output``, ``ray`` and
        ``overwrite`` (where it writes, how it reaches Ray, whether it may replace). Stages whose
        outputs do not depend on further fields (replica counts) override this."""
        body = {k: v for k, v in self.model_dump(mode="json").items() if k not in UNHASHED_FIELDS}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def forbid_keys(section: BaseModel, names: Sequence[str], where: str, reason: str) -> None:
    """Raise ValueError when any of ``names`` was given in ``section``: keys a shared sub-config has
    but that the enclosing config sets itself (or cannot honour), so they would be ignored."""
    given = [n for n in names if n in section.model_fields_set]
    if given:
        keys = ", ".join(f"{where}.{n}" for n in given)
        raise ValueError(f"{keys}: {reason}; remove {'it' if len(given) == 1 else 'them'}")


def _allowed_keys(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """Field names allowed at ``loc[:-1]`` (for 'unknown key' messages)."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if fields is None or not isinstance(part, str) or part not in fields:
            return []
        annotation = fields[part].annotation
        current = _first_model(annotation)
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}).keys())


def _first_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def format_validation_error(model: type[BaseModel], err: ValidationError) -> str:
    """One line per problem: ``field = value: what is wrong / allowed``."""
    lines = []
    for item in err.errors():
        loc = [p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        field = ".".join(str(p) for p in loc) or "<root>"
        value = item.get("input")
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"{field}: unknown key (remove it or fix its spelling){hint}")
        elif item["type"] == "missing":
            lines.append(f"{field}: required field is missing; set it in the YAML or with --set {field}=...")
        else:
            shown = json.dumps(value, default=str)
            if len(shown) > 120:
                shown = shown[:117] + "..."
            lines.append(f"{field} = {shown}: {item['msg']}")
    return f"invalid {model.__name__}:\n  " + "\n  ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], yaml-parsed c). Values are YAML scalars or flow lists/maps."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.max_steps=10")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({e})") from e
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b=c`` override applied (creating maps; ``a.0.b`` indexes lists)."""
    out = json.loads(json.dumps(data))  # deep copy of plain YAML data
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = out
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):  # list items by index: inputs.0.limit=10
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"--set {text!r}: {'.'.join(parts[:i]) or 'list'} has items 0.."
                                      f"{len(node) - 1}; {p!r} is not one of them")
                key: Any = int(p)
            elif isinstance(node, dict):
                key = p
            else:
                raise ConfigError(f"--set {text!r}: {parts[i - 1]!r} is a value, not a section")
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}
                node = node[key]
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass an existing YAML with --config")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def build_config(model: type[C], data: dict[str, Any] | None = None, overrides: Sequence[str] = ()) -> C:
    """Validate plain data (plus overrides) into ``model``; raise ConfigError with a readable message."""
    merged = apply_overrides(data or {}, overrides)
    try:
        return model.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(format_validation_error(model, e)) from None


def load_config(model: type[C], path: str | Path | None = None, overrides: Sequence[str] = ()) -> C:
    return build_config(model, load_yaml(path) if path else {}, overrides)


def run_job(
    model: type[C],
    main: Callable[[C], Any],
    argv: Sequence[str] | None = None,
    description: str | None = None,
    check: Callable[[C], None] | None = None,
    describe: Callable[[C], str] | None = None,
) -> int:
    """Parse ``--config/--set/--dry-run``, validate, then call ``main(config)``.

    ``check(config)`` runs what the model cannot see (API-key variables, data a config names) and
    raises ConfigError, also on ``--dry-run``; ``describe(config)`` is what ``--dry-run`` prints
    (default: the resolved config as YAML with its hash).

    Returns the process exit code: 2 for a bad config (before any cluster work), 1 for any
    other project error, else what ``main`` returned (``None`` -> 0).
    """
    parser = argparse.ArgumentParser(description=description or model.__doc__)
    parser.add_argument("--config", help="YAML config file (defaults apply where omitted)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="A.B=C",
                        help="override one field, e.g. --set train.max_steps=10 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(model, args.config, args.overrides)
        if check is not None:
            check(config)
        if args.dry_run:
            if describe is not None:
                print(describe(config), end="")
            else:
                print(f"# {model.__name__} (hash {config.config_hash()}, content hash {config.content_hash()})")
                print(config.to_yaml(), end="")
            return 0
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except EmbedforgeError as e:  # e.g. a dataset the plan fingerprints is missing
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    try:
        result = main(config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except EmbedforgeError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return int(result) if isinstance(result, int) else 0


def config_from_app_args(cls: type[C], args: dict[str, Any] | None) -> C:
    """A Serve app builder's config from its ``args``: ``{"config": path, "set": ["a.b=c", ...]}``
    (a YAML file plus overrides, as the jobs take them) or the config's fields themselves."""
    args = dict(args or {})
    if "config" in args:
        config = load_config(cls, args.pop("config"), list(args.pop("set", [])))
        if args:
            raise ConfigError(f"app args: unexpected keys {sorted(args)} beside 'config' (put overrides in 'set')")
        return config
    return build_config(cls, args)
