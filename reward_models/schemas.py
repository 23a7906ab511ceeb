"""Request and response schemas of the scoring API, and its error type (see ``api.py``)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import pydantic as pd
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

# strict: JSON types only, no coercion; unknown fields are errors, not silently dropped

STRICT = ConfigDict(extra="forbid", strict=True)
Id = Annotated[str, Field(max_length=256)] | StrictInt
NonEmpty = Annotated[str, Field(min_length=1)]


# a fixed set: templates build their turn markers from the role (tiny: '<|' + role + '|>'), so a free-form
# role such as "end" or "system|><|assistant" could forge special tokens
ROLES = ("system", "user", "assistant", "tool")


class Message(BaseModel):
    model_config = STRICT
    role: Literal[ROLES]
    content: str


Conversation = Annotated[list[Message], Field(min_length=1)]


class PromptItem(BaseModel):
    """A prompt (one user turn, or messages) and the response to score; an empty response is scored."""
    model_config = STRICT
    id: Id
    prompt: NonEmpty | Conversation
    response: str


class MessagesItem(BaseModel):
    """A whole conversation, scored at its last (assistant) turn."""
    model_config = STRICT
    id: Id
    messages: Conversation

    @pd.field_validator("messages")
    @classmethod
    def _ends_with_assistant(cls, messages):
        if messages[-1].role != "assistant":
            raise ValueError("the conversation must end with an assistant turn (that is what gets scored)")
        return messages


class TextItem(BaseModel):
    """Raw text, already formatted; EOS is appended when missing."""
    model_config = STRICT
    id: Id
    text: NonEmpty


def _shape(value: Any) -> str | None:
    if isinstance(value, dict):
        return next((k for k in ("text", "messages", "prompt") if k in value), "prompt" if "response" in value else None)
    return None


class InvalidItem(BaseModel):
    id: Any = None
    message: str


def _lenient(value: Any, handler) -> Any:
    """A bad item becomes an ``InvalidItem`` (answered with a per-item error) instead of failing the request."""
    try:
        return handler(value)
    except ValidationError as exc:
        item_id = value.get("id") if isinstance(value, dict) else None
        item_id = item_id if isinstance(item_id, str | int) and not isinstance(item_id, bool) else None
        errors = exc.errors(include_url=False, include_input=False)
        for e in errors:  # drop the union tag pydantic puts first ("text.text: ..." -> "text: ...")
            e["loc"] = e["loc"][1:] if e["loc"] and e["loc"][0] in ("prompt", "messages", "text") else e["loc"]
        return InvalidItem(id=item_id, message=describe(errors))


Item = Annotated[
    Annotated[PromptItem, pd.Tag("prompt")] | Annotated[MessagesItem, pd.Tag("messages")]
    | Annotated[TextItem, pd.Tag("text")],
    pd.Discriminator(_shape, custom_error_type="invalid_item",
                     custom_error_message="an item is an object with `id` and `prompt`+`response`, `messages` or `text`"),
    pd.WrapValidator(_lenient),
]


class ScoreRequest(BaseModel):
    model_config = STRICT
    items: Annotated[list[Item], Field(min_length=1)]
    truncate: StrictBool = Field(False, description="Cut over-length inputs from the left instead of rejecting them.")


class CompareRequest(BaseModel):
    model_config = STRICT
    prompt: NonEmpty | Conversation
    chosen: str | Conversation
    rejected: str | Conversation
    truncate: StrictBool = False


# the answers, for the OpenAPI schema (handlers build plain dicts: no second validation pass per request)
ItemError = pd.create_model("ItemError", code=(str, ...), message=(str, ...))
ItemResult = pd.create_model("ItemResult", id=(Any, ...), reward=(float | None, ...), normalized_reward=(float | None, ...),
                             tokens=(int | None, ...), truncated=(bool, ...), error=(ItemError | None, ...))
ScoreResponse = pd.create_model("ScoreResponse", model_revision=(str, ...), results=(list[ItemResult], ...))
Scored = pd.create_model("Scored", reward=(float, ...), normalized_reward=(float, ...), tokens=(int, ...),
                         truncated=(bool, ...))
CompareResponse = pd.create_model("CompareResponse", model_revision=(str, ...), chosen=(Scored, ...),
                                  rejected=(Scored, ...), margin=(float, ...), p_chosen=(float, ...))


def describe(errors: list[dict]) -> str:
    parts = [f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}" for e in errors[:3]]
    return "; ".join(parts) + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else "")


class Json(JSONResponse):
    """ASCII-escaped JSON: a lone surrogate in an id (legal in JSON text) cannot break the encoding."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


