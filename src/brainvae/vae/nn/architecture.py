"""What every architecture config shares: a JSON-ready dict form tagged with its architecture name.

A checkpoint's ``config.json`` stores ``to_dict()``; ``from_dict`` reads it back and refuses keys the
architecture does not know (a config of another architecture or version), naming them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

__all__ = ["ArchitectureConfig"]

_Config = TypeVar("_Config", bound="ArchitectureConfig")


class ArchitectureConfig:
    """Mixin of the frozen dataclass configs (``VAEConfig``, ``SpatialConfig``)."""

    architecture: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {"architecture": self.architecture, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}

    @classmethod
    def from_dict(cls: type[_Config], data: Mapping[str, Any]) -> _Config:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        data = {k: v for k, v in data.items() if k != "architecture"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {cls.architecture} model config keys: {sorted(unknown)}")
        return cls(**dict(data))
