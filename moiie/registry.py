"""Registries: one per swappable slot (routers, experts, projectors, vision encoders, LLM backbones).

A registry maps a ``kind`` name to its config class and its builder. Config fields that hold a slot
are annotated with :func:`Slot`, which validates a mapping against whatever is registered *at
validation time*, so a user's own router plugs in with one ``register`` call and no edit to moiie.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import PydanticCustomError, core_schema

from moiie.config_base import Config

C = TypeVar("C", bound=Config)
B = TypeVar("B", bound=Callable[..., Any])


class RegistryError(ValueError):
    """A registry was asked for an unknown kind, or to register a kind twice."""


@dataclass(frozen=True)
class Entry:
    kind: str
    config_class: type[Config]
    builder: Callable[..., Any]
    example: Callable[[], Config]
    """Returns a small valid config of this kind (used by contract tests and the demo)."""


class Registry(Generic[C]):
    """Name -> (config class, builder) for one slot.

    >>> @ROUTERS.register("my_router", MyRouterConfig)
    ... def build_my_router(config, *, d_model, topology): ...
    """

    def __init__(self, slot: str):
        self.slot = slot
        self._entries: dict[str, Entry] = {}

    def register(
        self,
        kind: str,
        config_class: type[C],
        *,
        example: Callable[[], C] | None = None,
    ) -> Callable[[B], B]:
        """Decorator registering ``builder`` under ``kind``; registering a name twice is an error."""
        if kind in self._entries:
            raise RegistryError(
                f"{self.slot} kind {kind!r} is already registered "
                f"(by {self._entries[kind].config_class.__qualname__}); choose another name"
            )
        field = config_class.model_fields.get("kind")
        if field is None or field.default != kind:
            raise RegistryError(
                f"{config_class.__qualname__} must declare `kind: Literal[{kind!r}] = {kind!r}` "
                f"to be registered as {self.slot} kind {kind!r}"
            )

        def decorator(builder: B) -> B:
            self._entries[kind] = Entry(kind, config_class, builder, example or config_class)
            return builder

        return decorator

    def unregister(self, kind: str) -> None:
        """Remove ``kind`` (for tests and interactive sessions)."""
        self._entry(kind)
        del self._entries[kind]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[k] for k in self.names()]

    def __contains__(self, kind: object) -> bool:
        return kind in self._entries

    def _entry(self, kind: str) -> Entry:
        try:
            return self._entries[kind]
        except KeyError:
            raise RegistryError(
                f"unknown {self.slot} kind {kind!r}; registered kinds: {self.names()}"
            ) from None

    def config_class(self, kind: str) -> type[Config]:
        return self._entry(kind).config_class

    def example(self, kind: str) -> Config:
        return self._entry(kind).example()

    def build(self, config: Config, /, **context: Any) -> Any:
        """Build the module that ``config`` describes; ``context`` carries sizes the slot needs."""
        return self._entry(config.kind).builder(config, **context)

    def validate(self, data: Any) -> Config:
        """Turn a mapping (or an already-built config of a registered kind) into that kind's config."""
        if isinstance(data, Config) and data.kind in self._entries:
            expected = self._entries[data.kind].config_class
            if not isinstance(data, expected):
                raise PydanticCustomError(
                    "moiie_kind",
                    "config of kind {kind} must be a {expected}",
                    {"kind": data.kind, "expected": expected.__qualname__},
                )
            return data
        if isinstance(data, Config):
            data = data.model_dump()
        if not isinstance(data, dict):
            raise PydanticCustomError(
                "moiie_slot",
                "expected a mapping with a `kind` field for {slot}, got {got}",
                {"slot": self.slot, "got": type(data).__name__},
            )
        kind = data.get("kind")
        if not isinstance(kind, str) or kind not in self._entries:
            raise PydanticCustomError(
                "moiie_unknown_kind",
                "unknown {slot} kind {kind}; registered kinds: {names}",
                {"slot": self.slot, "kind": repr(kind), "names": ", ".join(self.names())},
            )
        return self._entries[kind].config_class.model_validate(data)

    def __repr__(self) -> str:
        return f"Registry({self.slot!r}, kinds={self.names()})"


class _SlotAnnotation:
    """Pydantic hook: validate through the registry, serialise as the concrete config."""

    def __init__(self, registry: Registry):
        self.registry = registry

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler):
        registry = self.registry
        return core_schema.no_info_plain_validator_function(
            registry.validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda value, info: value.model_dump(mode=info.mode, exclude_unset=info.exclude_unset),
                info_arg=True,
            ),
        )

    def __get_pydantic_json_schema__(self, schema: Any, handler: GetJsonSchemaHandler):
        members = [handler(e.config_class.__pydantic_core_schema__) for e in self.registry.entries()]
        mapping = {e.kind: m["$ref"] for e, m in zip(self.registry.entries(), members) if "$ref" in m}
        discriminator = {"propertyName": "kind", **({"mapping": mapping} if mapping else {})}
        return {"oneOf": members, "discriminator": discriminator}


def Slot(registry: Registry) -> Any:
    """Annotation for a config field holding any kind registered in ``registry``."""
    return Annotated[Config, _SlotAnnotation(registry)]


ROUTERS: Registry = Registry("router")
EXPERTS: Registry = Registry("expert")
PROJECTORS: Registry = Registry("projector")
VISION_ENCODERS: Registry = Registry("vision encoder")
LLM_BACKBONES: Registry = Registry("LLM backbone")
FFNS: Registry = Registry("ffn")
