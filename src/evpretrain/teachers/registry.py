"""Teachers by name: ``create_teacher("efficientnet_lite0")``, ``create_teacher("clip_vit_b16", weights=PATH)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from evpretrain.config import ConfigError
from evpretrain.teachers.base import Teacher

__all__ = ["create_teacher", "list_teachers", "register_teacher"]

_TEACHERS: dict[str, Callable[..., Teacher]] = {}


def register_teacher(name: str) -> Callable[[type[Teacher]], type[Teacher]]:
    """Class decorator: make a Teacher subclass available to ``create_teacher`` under ``name``."""

    def register(cls: type[Teacher]) -> type[Teacher]:
        if name in _TEACHERS:
            raise ValueError(f"teacher {name!r} is registered twice")
        cls.name = name
        _TEACHERS[name] = cls
        return cls

    return register


def list_teachers() -> list[str]:
    return sorted(_TEACHERS)


def create_teacher(name: str, **config: Any) -> Teacher:
    """Build the frozen teacher ``name`` (eval mode, no gradients) from its config fields (e.g. ``weights``).

    Raises ConfigError naming the known teachers for an unknown name (``pretrain.teacher.name``)."""
    if name not in _TEACHERS:
        raise ConfigError(f"unknown teacher {name!r}; known teachers: {', '.join(list_teachers())}")
    return _TEACHERS[name](**config)
