"""RPC parameter schemas (pydantic, at the edge only) and validation into typed params."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from stoker.errors import InvalidParams


class Params(BaseModel):
    """Base for every method's parameters: strict types, no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NoParams(Params):
    pass


class VMRef(Params):
    ref: str


class ListParams(Params):
    pass


P = TypeVar("P", bound=Params)


def validate(model: type[P], method: str, raw: dict[str, Any]) -> P:
    """Validate raw JSON params; errors name the field and what was wrong."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "params"
            parts.append(f"{loc}: {err['msg']}")
        raise InvalidParams(f"invalid parameters for {method}: " + "; ".join(parts)) from None
