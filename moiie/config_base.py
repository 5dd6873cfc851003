"""Base class of every moiie config: frozen, strict about unknown fields, documented per field."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound="Config")
_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


class ConfigError(ValueError):
    """A config failed validation; the message names each offending path (e.g. ``moe.router.top_k``)."""

    def __init__(self, errors: list[tuple[str, str]], source: str | None = None):
        self.errors = errors
        where = f" in {source}" if source else ""
        lines = [f"invalid config{where}:"] + [f"  {path or '<root>'}: {msg}" for path, msg in errors]
        super().__init__("\n".join(lines))

    @classmethod
    def from_validation_error(cls, err: ValidationError, source: str | None = None) -> ConfigError:
        out = []
        for e in err.errors(include_url=False):
            path = ".".join(str(p) for p in e["loc"])
            msg = e["msg"]
            if e["type"] == "extra_forbidden":
                msg = "unknown field (not part of this config)"
            if e["type"] == "value_error":
                # cross-field validators report "relative.path: reason" lines; anchor them at this model
                msg = msg.removeprefix("Value error, ")
                for line in msg.split("\n"):
                    rel, sep, reason = line.partition(": ")
                    if sep and _PATH.fullmatch(rel):
                        out.append((f"{path}.{rel}" if path else rel, reason))
                    else:
                        out.append((path, line))
                continue
            out.append((path, msg))
        return cls(out, source)


class Config(BaseModel):
    """Frozen pydantic v2 model with ``extra="forbid"``; subclasses document every field."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
        validate_default=True,
        allow_inf_nan=False,
    )

    kind: str

    @classmethod
    def parse(cls: type[T], data: Any, source: str | None = None) -> T:
        """Validate ``data``; raise :class:`ConfigError` naming every bad path."""
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError.from_validation_error(err, source) from None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        return cls.parse(json.loads(text))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def from_yaml(cls: type[T], text: str, source: str | None = None) -> T:
        return cls.parse(yaml.safe_load(text), source)

    @classmethod
    def load(cls: type[T], path: str | Path) -> T:
        """Load from a ``.json``, ``.yaml`` or ``.yml`` file."""
        path = Path(path)
        text = path.read_text()
        if path.suffix == ".json":
            try:
                return cls.parse(json.loads(text), str(path))
            except json.JSONDecodeError as err:
                raise ConfigError([("", f"not valid JSON: {err}")], str(path)) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError([("", f"not valid YAML: {err}")], str(path)) from None
        return cls.parse(data, str(path))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.write_text(self.to_json() if path.suffix == ".json" else self.to_yaml())
