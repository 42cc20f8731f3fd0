"""What a job does when it fires: the action specs carried inside a job and inside its trigger.

Workers hold the executors (``worker/actions/``); this module only describes them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl

HTTP_METHODS = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _type_required(schema: dict[str, Any]) -> None:
    schema["required"] = sorted({"type", *schema.get("required", [])})


class ShellAction(BaseModel):
    """Run a program with these arguments (no shell unless ``argv`` asks for one)."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_type_required)

    type: Literal["shell"] = "shell"
    argv: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    success_exit_codes: list[int] = Field(default_factory=lambda: [0], min_length=1)


class HttpAction(BaseModel):
    """Send one HTTP request; the run succeeds when the response status is expected."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_type_required)

    type: Literal["http"] = "http"
    url: HttpUrl
    method: HTTP_METHODS = "GET"
    headers: dict[str, str] = Field(default_factory=dict)
    body: str | None = None
    expect_status: list[Annotated[int, Field(ge=100, le=599)]] = Field(
        default_factory=lambda: [200, 201, 202, 204], min_length=1
    )


Action = Annotated[ShellAction | HttpAction, Field(discriminator="type")]
