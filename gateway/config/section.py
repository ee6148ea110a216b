"""What every section of the config model shares: unknown keys refused, numbers not booleans, paths in problems."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError


def problem(path: str, text: str) -> PydanticCustomError:
    # The message carries its own path: cross-field checks run on a parent
    # model but must still name the exact key that is wrong.
    return PydanticCustomError("config_problem", "{path}: {text}", {"path": path, "text": text})


class Section(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        # Numbers stay lax (``${PORT}`` interpolates to a string), but YAML's
        # ``yes``/``true`` must not silently become 1.
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and field.annotation in (int, float):
            raise ValueError("must be a number, not true/false")
        return value


PositiveSeconds = Annotated[float, Field(gt=0)]


class RateLimit(Section):
    """A token bucket: ``requests_per_s`` refill, ``burst`` capacity."""

    requests_per_s: PositiveSeconds
    burst: Annotated[int, Field(ge=1)]
