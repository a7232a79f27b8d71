"""The error bodies of the HTTP API: every 4xx answer is JSON with a ``detail`` that says what is wrong."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Problem(BaseModel):
    detail: str = Field(description="What is wrong, in words")


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationProblem(Problem):
    errors: list[FieldError] = Field(default_factory=list, description="Per field, when parameters are invalid")


def problem(description: str) -> dict[str, object]:
    """An OpenAPI ``responses`` entry for a :class:`Problem` answer."""
    return {"model": Problem, "description": description}
