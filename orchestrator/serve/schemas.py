"""Request bodies, in OpenAI's API shape where one exists, and errors as OpenAI shapes them.
Unknown fields are refused (a misspelt `stepz` would otherwise be ignored)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestrator.ensemble import STRATEGIES


class RoutingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    strategy: str = "top1"
    k: int = Field(2, ge=1, description="Experts kept by topk.")

    @field_validator("strategy")
    @classmethod
    def known(cls, value: str) -> str:
        if value not in STRATEGIES:
            raise ValueError(f"unknown {value!r}; expected one of {', '.join(STRATEGIES)}")
        return value


class Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    seed: int = 0
    routing: RoutingBody = Field(default_factory=RoutingBody)
    deterministic: bool = Field(False, description="Run batch-invariantly: the same bytes "
                                "whatever else is in flight.")
    timeout: float | None = Field(None, gt=0, description="Seconds before a 504.")
    user: str | None = None


class ImageBody(Common):
    n: int = Field(1, ge=1, le=64)
    steps: int | None = Field(None, ge=1, le=1000)
    prompt: str | None = Field(None, description="Accepted for OpenAI clients; the experts "
                               "are unconditional, so it is not used.")
    response_format: Literal["b64_json"] = "b64_json"
    grid: bool = Field(False, description="Also the grid PNG `islands sample` writes.")


class CompletionBody(Common):
    prompt: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=65536)
    temperature: float | None = Field(None, ge=0)
    refresh_every: int | None = Field(None, ge=0)
    stream: bool = False


def error_body(message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def field_of(location: tuple[Any, ...] | list[Any]) -> str:
    """pydantic's error location without the leading 'body': 'routing.k'."""
    parts = [str(part) for part in location]
    return ".".join(parts[1:] if parts and parts[0] == "body" else parts) or "body"
