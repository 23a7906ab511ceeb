"""A Python client for the scoring API, and a reward function that PPO can use instead of a local model.

    client = RewardClient("http://127.0.0.1:8000")          # the key: api_key=... or $RLHF_API_KEY
    client = RewardClient(["http://10.0.0.1:8000", "http://10.0.0.2:8000"])  # replicas: spread, failover
    client.score([{"id": 0, "prompt": "Hi", "response": "Hello!"}])
    reward_fn = RemoteRewardFunction(client)                 # (prompts, responses) -> list[float]

Scoring is idempotent, so every failure that may be transient is retried with exponential backoff:
connection errors and timeouts, 429 (after the server's Retry-After), and 5xx. Other 4xx answers are
the caller's mistake and raise ``RewardAPIError`` at once, with the server's error code and message.
"""

from __future__ import annotations

import itertools
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
    """``base_url``: one server, or a list of replicas. With several, requests go round-robin, and one that
    fails in a way worth retrying (unreachable, 429, 5xx) goes on to the next replica at once; a replica
    that could not be reached is skipped for ``cooldown`` seconds. The backoff starts after every replica
    has failed once, and ``retries`` counts such rounds."""

    def __init__(self, base_url: str | list[str], api_key: str | None = None, timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.5, max_backoff: float = 30.0, api_key_env: str = "RLHF_API_KEY",
                 cooldown: float = 5.0):
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("RewardClient needs at least one URL")
        self.base_urls = [u.rstrip("/") for u in urls]
        self.base_url = self.base_urls[0]
        self.retries, self.backoff, self.max_backoff, self.cooldown = retries, backoff, max_backoff, cooldown
        key = (api_key if api_key is not None else os.environ.get(api_key_env, "")).strip()  # as the server does
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = [httpx.Client(base_url=u, headers=headers, timeout=timeout) for u in self.base_urls]
        self._next = itertools.count()
        self._down_until = [0.0] * len(self.base_urls)  # monotonic time until which a replica is skipped
        self.model_revision: str | None = None  # of the last answer: log it beside the rewards

    def close(self) -> None:
        for http in self._http:
            http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        retry_after = response.headers.get("Retry-After", "") if response is not None else ""
        if retry_after.isdigit():  # the server knows its queue better than our backoff does
            return min(float(retry_after), self.max_backoff)
        return min(self.backoff * 2**attempt, self.max_backoff) * random.uniform(0.5, 1.0)

    def _order(self) -> list[int]:
        """This request's replicas: round-robin from the next one, those recently unreachable last."""
        n, start, now = len(self._http), next(self._next), time.monotonic()
        order = [(start + k) % n for k in range(n)]
        return sorted(order, key=lambda i: self._down_until[i] > now)

    def request(self, method: str, path: str, json: dict | None = None) -> dict:
        """One API call with retries (and failover across replicas); returns the JSON body of a 2xx answer."""
        for attempt in range(self.retries + 1):
            for i in self._order():
                response, failure = None, None
                try:
                    response = self._http[i].request(method, path, json=json)
                except httpx.TransportError as exc:  # refused, reset, timed out: worth another try
                    failure = f"{self.base_urls[i]}: {type(exc).__name__}: {exc or 'no detail'}"
                    self._down_until[i] = time.monotonic() + self.cooldown
                    continue
                revision = response.headers.get("X-Model-Revision")
                self.model_revision = revision or self.model_revision
                if response.status_code < 300:
                    return self._json(response)
                if response.status_code not in RETRY_STATUSES:
                    code, message = self._error(response)
                    raise RewardAPIError(f"{method} {path}: {response.status_code} {code}: {message}",
                                         response.status_code, code)
                failure = "{}: {} {}: {}".format(self.base_urls[i], response.status_code, *self._error(response))
            if attempt < self.retries:
                time.sleep(self._delay(attempt, response))
        target = self.base_url if len(self.base_urls) == 1 else f"{len(self.base_urls)} replicas"
        raise RewardAPIUnavailable(f"{method} {path} on {target} failed after {self.retries + 1} attempts: {failure}",
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
        """Whether a replica has the model loaded and warm (no retries: this is what you poll)."""
        for http in self._http:
            try:
                if http.get("/readyz").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
        return False

    def wait_ready(self, timeout: float = 300.0, interval: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise RewardAPIUnavailable(f"{', '.join(self.base_urls)} not ready after {timeout:.0f}s")
            time.sleep(interval)


class RemoteRewardFunction:
    """``(prompts, responses) -> rewards`` through the API, for the PPO stage instead of a local model.

    ``prompts``: one per response, each a list of messages (or a string); ``responses``: the generated
    texts. Rewards are normalized with the RM's training statistics unless ``normalized=False``. An item
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
