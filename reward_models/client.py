"""A Python client for the scoring API, and a reward function that PPO can use instead of a local model.

    client = RewardClient("http://127.0.0.1:8000")          # the key: api_key=... or $RLHF_API_KEY
    client.score([{"id": 0, "prompt": "Hi", "response": "Hello!"}])
    reward_fn = RemoteRewardFunction(client)                 # (prompts, responses) -> list[float]

Scoring is idempotent, so every failure that may be transient is retried with exponential backoff:
connection errors and timeouts, 429 (after the server's Retry-After), and 5xx. Other 4xx answers are
the caller's mistake and raise ``RewardAPIError`` at once, with the server's error code and message.
"""

from __future__ import annotations

import os
import random
import time

import httpx


class RewardAPIError(Exception):
    """The server refused the request (4xx), or answered something that is not the API's JSON."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


class RewardAPIUnavailable(RewardAPIError):
    """Retries exhausted: the server was unreachable, timed out, overloaded (429) or failing (5xx)."""


class RewardItemError(RewardAPIError):
    """An item of a scoring request got its own error (e.g. too long, malformed)."""

    def __init__(self, message: str, index: int, code: str | None):
        super().__init__(message, 200, code)
        self.index = index


RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class RewardClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.5, max_backoff: float = 30.0, api_key_env: str = "RLHF_API_KEY"):
        self.base_url = base_url.rstrip("/")
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        key = (api_key if api_key is not None else os.environ.get(api_key_env, "")).strip()  # as the server does
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self.model_revision: str | None = None  # of the last answer: log it beside the rewards

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        retry_after = response.headers.get("Retry-After", "") if response is not None else ""
        if retry_after.isdigit():  # the server knows its queue better than our backoff does
            return min(float(retry_after), self.max_backoff)
        return min(self.backoff * 2**attempt, self.max_backoff) * random.uniform(0.5, 1.0)

    def request(self, method: str, path: str, json: dict | None = None) -> dict:
        """One API call with retries; returns the JSON body of a 2xx answer."""
        for attempt in range(self.retries + 1):
            response, failure = None, None
            try:
                response = self._http.request(method, path, json=json)
            except httpx.TransportError as exc:  # refused, reset, timed out: worth another try
                failure = f"{type(exc).__name__}: {exc or 'no detail'}"
            if response is not None:
                revision = response.headers.get("X-Model-Revision")
                self.model_revision = revision or self.model_revision
                if response.status_code < 300:
                    return self._json(response)
                if response.status_code not in RETRY_STATUSES:
                    code, message = self._error(response)
                    raise RewardAPIError(f"{method} {path}: {response.status_code} {code}: {message}",
                                         response.status_code, code)
                failure = "{} {}: {}".format(response.status_code, *self._error(response))
            if attempt < self.retries:
                time.sleep(self._delay(attempt, response))
        raise RewardAPIUnavailable(f"{method} {self.base_url}{path} failed after {self.retries + 1} attempts: {failure}",
                                   response.status_code if response is not None else None,
                                   self._error(response)[0] if response is not None else None)

    @staticmethod
    def _json(response: httpx.Response) -> dict:
        try:
            return response.json()
        except ValueError:
            raise RewardAPIError(f"{response.request.url}: the answer is not JSON", response.status_code) from None

    @staticmethod
    def _error(response: httpx.Response) -> tuple[str, str]:
        try:
            error = response.json()["error"]
            return str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            return "unknown", response.text[:200]

    def score(self, items: list[dict], truncate: bool = False) -> list[dict]:
        """Per-item results (``reward``, ``normalized_reward``, ``tokens``, ``truncated``, ``error``), in order."""
        return self.request("POST", "/v1/score", {"items": items, "truncate": truncate})["results"]

    def compare(self, prompt, chosen, rejected, truncate: bool = False) -> dict:
        return self.request("POST", "/v1/compare", {"prompt": prompt, "chosen": chosen, "rejected": rejected,
                                                    "truncate": truncate})

    def models(self) -> dict:
        return self.request("GET", "/v1/models")

    def ready(self) -> bool:
        """Whether the model is loaded and warm (no retries: this is what you poll)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 300.0, interval: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise RewardAPIUnavailable(f"{self.base_url} not ready after {timeout:.0f}s")
            time.sleep(interval)


class RemoteRewardFunction:
    """``(prompts, responses) -> rewards`` through the API, for the PPO stage instead of a local model.

    ``prompts``: one per response, each a list of messages (or a string); ``responses``: the generated
    texts. Rewards are normalised with the RM's training statistics unless ``normalized=False``. An item
    error (e.g. over the model's length) raises ``RewardItemError`` naming the item, unless
    ``truncate=True`` asks the server to cut over-length inputs from the left.
    """

    def __init__(self, client: RewardClient, normalized: bool = True, truncate: bool = False,
                 batch_size: int | None = None):
        self.client, self.normalized, self.truncate = client, normalized, truncate
        self.batch_size = batch_size

    def _chunk(self) -> int:
        if self.batch_size is None:  # the server's own per-request limit, so no chunk is ever a 413
            self.batch_size = int(self.client.models()["limits"]["max_items"])
        return self.batch_size

    def __call__(self, prompts: list, responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        key = "normalized_reward" if self.normalized else "reward"
        rewards: list[float] = []
        step = self._chunk()
        for start in range(0, len(prompts), step):
            items = [{"id": start + i, "prompt": p, "response": r}
                     for i, (p, r) in enumerate(zip(prompts[start : start + step], responses[start : start + step]))]
            results = self.client.score(items, truncate=self.truncate)
            if len(results) != len(items):
                raise RewardAPIError(f"asked for {len(items)} rewards, got {len(results)}")
            for item, result in zip(items, results):
                if result["error"] is not None:
                    code, message = result["error"]["code"], result["error"]["message"]
                    raise RewardItemError(f"item {item['id']}: {code}: {message}", item["id"], code)
                rewards.append(float(result[key]))
        return rewards

    @property
    def model_revision(self) -> str | None:
        return self.client.model_revision
