"""The reward-server protocols other trainers speak, as thin adapters over the same service (docs/api.md):
the same scorer, batcher, limits, auth, disconnect handling and drain as /v1/score.

- OpenRLHF's remote reward model (``--remote_rm_url``; openrlhf/cli/serve_rm.py and the client in
  openrlhf/utils/agent.py): ``POST /get_reward`` with ``{"query": [...], "prompts": [...], "labels": [...]}``
  -> ``{"rewards": [...], "scores": [...], "extra_logs": {...}}``. A query is the full formatted text (the
  policy's decoded sequence); it is tokenized as OpenRLHF's server does (no special tokens added, no EOS
  appended) and cut to the model's length -- from the left here, so the end where the reward is read
  survives. The rewards are normalized with the RM's training statistics (``openrlhf_reward="raw"``: not).
- vLLM's classification API (``POST /classify``), which veRL's reward loop calls for a discriminative RM:
  ``{"input": str | [str] | [ids] | [[ids]]}`` or ``{"messages": [...]}`` -> ``{"data": [{"index", "label",
  "probs": [p], "num_classes": 1}], "usage": ...}``; ``p`` is the raw reward with ``use_activation: false``
  (veRL's setting; older vLLM: ``activation``), else its sigmoid, as vLLM's pooler does for one label.

Errors keep this API's JSON shape and status codes (a trainer only looks at the status).
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from .rendering import Rendered, TooLong
from .schemas import ROLES, ApiError, Json
from .service import Service, sigmoid

# unknown fields are ignored, as the servers these stand in for do (their clients add fields over time)
LENIENT = ConfigDict(extra="ignore", strict=True)
Text = Annotated[StrictStr, Field(min_length=1)]
Texts = Annotated[list[Text], Field(min_length=1)]


class OpenRLHFRequest(BaseModel):
    model_config = LENIENT
    query: Texts
    prompts: list[StrictStr] | None = None  # for rule-based reward functions: unused by a reward model
    labels: list[Any] | None = None


class TextPart(BaseModel):
    model_config = LENIENT
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = LENIENT
    role: Literal[ROLES]
    content: StrictStr | list[TextPart]


class ClassifyRequest(BaseModel):
    model_config = LENIENT
    model: StrictStr | None = None  # any name: trainers send a path or Hub id, not this server's model id
    input: Text | Texts | Annotated[list[StrictInt], Field(min_length=1)] | \
        Annotated[list[Annotated[list[StrictInt], Field(min_length=1)]], Field(min_length=1)] | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: StrictBool | None = None  # vLLM's defaults: on for input, off for messages
    truncate_prompt_tokens: Annotated[StrictInt, Field(ge=-1)] | None = None  # -1: the model's length
    truncation_side: Literal["left", "right"] | None = None
    use_activation: StrictBool | None = None
    activation: StrictBool | None = None  # vLLM < 0.11.2's name, still sent by veRL's reward loop
    add_generation_prompt: StrictBool = False


async def _rewards(service: Service, request: Request, items: list, truncate: bool,
                   max_length: int | None = None) -> tuple[list[float], list[Rendered]]:
    """Rewards of items (dicts to render, or token-id lists); one bad item fails the request, as these
    protocols have no per-item errors."""
    request.state.items = len(items)
    if len(items) > service.limits.max_items:
        raise ApiError(413, "too_many_items", f"{len(items)} inputs, over the limit of {service.limits.max_items}")
    scorer, _ = service.ready()
    limit = max_length or scorer.max_length
    texts = [i for i, item in enumerate(items) if isinstance(item, dict)]
    rendered: list = list(items)
    for i, r in zip(texts, await service.render([items[i] for i in texts], truncate, limit)):
        rendered[i] = r
    for i, r in enumerate(rendered):
        if isinstance(r, list):  # token ids: as given, cut like text
            if not all(0 <= t < len(scorer.tokenizer) for t in r):
                raise ApiError(422, "invalid_request", f"input {i}: a token id is outside the vocabulary")
            if len(r) > limit and not truncate:
                r = TooLong(len(r), limit)
            else:
                r = rendered[i] = Rendered(r[-limit:], len(r) > limit)
        if isinstance(r, TooLong):
            raise ApiError(422, "too_long", f"input {i}: {r}")
        if isinstance(r, ApiError):
            raise ApiError(r.status, r.code, f"input {i}: {r.message}")
        if not r.n_tokens:  # "" with nothing added around it: no token to read a reward at
            raise ApiError(422, "invalid_request", f"input {i} is empty: there is nothing to score")
    if sum(r.n_tokens for r in rendered) > service.limits.max_total_tokens:
        raise ApiError(413, "too_many_tokens", f"the request has more than {service.limits.max_total_tokens} tokens")
    rewards = await service.run(rendered, request)
    bad = [i for i, r in enumerate(rewards) if not math.isfinite(r)]
    if bad:
        raise ApiError(422, "non_finite_reward", f"input {bad[0]}: the model's reward is not a finite number")
    service.metrics.items.labels("scored").inc(len(rewards))
    return rewards, rendered


def router(service: Service, openrlhf_reward: str = "normalized") -> APIRouter:
    if openrlhf_reward not in ("normalized", "raw"):
        raise ValueError(f"openrlhf_reward must be 'normalized' or 'raw', got {openrlhf_reward!r}")
    api = APIRouter(tags=["protocols"])

    @api.post("/get_reward", responses={413: {}, 422: {}, 429: {}, 503: {}})
    async def get_reward(body: OpenRLHFRequest, request: Request):
        """OpenRLHF's remote reward model: one reward per query (the whole formatted text), in order."""
        items = [{"text": q, "append_eos": False, "add_special_tokens": False} for q in body.query]
        raw, _ = await _rewards(service, request, items, truncate=True)
        rewards = [service.normalize(r) for r in raw] if openrlhf_reward == "normalized" else raw
        return Json({"rewards": rewards, "scores": rewards, "extra_logs": {"raw_reward": raw},
                     "model_revision": service.revision})

    @api.post("/classify", responses={413: {}, 422: {}, 429: {}, 503: {}})
    async def classify(body: ClassifyRequest, request: Request):
        """vLLM's classification API (as veRL's reward loop calls it): one raw score per input."""
        if (body.input is None) == (body.messages is None):
            raise ApiError(422, "invalid_request", "send exactly one of `input` and `messages`")
        if body.truncation_side == "right" or body.add_generation_prompt:
            raise ApiError(422, "invalid_request", "the reward is read at the last token: only truncation_side "
                           "'left' and add_generation_prompt false are supported")
        scorer, _ = service.ready()
        limit = scorer.max_length if body.truncate_prompt_tokens in (None, -1) else body.truncate_prompt_tokens
        if limit > scorer.max_length:
            raise ApiError(422, "invalid_request", f"truncate_prompt_tokens is over the model's length {scorer.max_length}")
        if body.messages is not None:
            messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                         else "".join(p.text for p in m.content)} for m in body.messages]
            items: list = [{"messages": messages, "add_special_tokens": body.add_special_tokens is True}]
        else:
            inputs = body.input
            inputs = [inputs] if isinstance(inputs, str) or isinstance(inputs[0], int) else inputs
            special = body.add_special_tokens is not False
            items = [x if isinstance(x, list) else {"text": x, "append_eos": False, "add_special_tokens": special}
                     for x in inputs]
        raw, rendered = await _rewards(service, request, items, truncate=body.truncate_prompt_tokens is not None,
                                       max_length=limit)
        activation = body.use_activation if body.use_activation is not None else body.activation
        probs = raw if activation is False else [sigmoid(r) for r in raw]
        label = (getattr(scorer.model.config, "id2label", None) or {0: "LABEL_0"}).get(0, "LABEL_0")
        tokens = sum(r.n_tokens for r in rendered)
        return Json({"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                     "model": service.model_id(), "model_revision": service.revision,
                     "data": [{"index": i, "label": label, "probs": [p], "num_classes": 1} for i, p in enumerate(probs)],
                     "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                               "prompt_tokens_details": None}})

    return api
