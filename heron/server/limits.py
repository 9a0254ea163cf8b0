"""Self-protection: per-API-key rate limits, and the drain state of a server that is shutting down.

`RateLimiter` keeps two token buckets per key (requests per minute, tokens per minute), as OpenAI
does: a bucket holds at most a minute's allowance and refills continuously. A generation request is
charged up front what it may cost, its prompt tokens plus max_tokens for each choice (OpenAI's
documented rule), so a caller cannot overrun the limit with requests already in flight. Past the
limit: 429, OpenAI's `rate_limit_exceeded` code and error type ("requests" / "tokens"), and
`Retry-After` saying when the bucket will hold enough again.

Buckets are kept per configured API key, or per client address when no keys are configured (a
bearer token anyone can make up is never a key), and their number is bounded: past `max_keys`,
buckets that have refilled (as good as new) are dropped first, then the least recently used.

`Drain` counts the HTTP requests in progress and flips to draining on the first SIGTERM: new
requests (and /health) get 503 while those in progress finish.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from heron.server.errors import APIError


@dataclass
class TokenBucket:
    capacity: float
    per_second: float
    level: float = -1.0  # -1: full on first use
    updated: float = 0.0

    def _refill(self, now: float) -> None:
        if self.level < 0:
            self.level, self.updated = self.capacity, now
        self.level = min(self.capacity, self.level + (now - self.updated) * self.per_second)
        self.updated = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until `amount` is available (0 if it is now); takes nothing."""
        self._refill(now)
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing / self.per_second

    def take(self, amount: float) -> None:
        self.level -= amount

    def is_full(self, now: float) -> bool:
        self._refill(now)
        return self.level >= self.capacity


@dataclass
class RateLimiter:
    requests_per_minute: int = 0  # 0: no limit
    tokens_per_minute: int = 0
    clock: Callable[[], float] = time.monotonic
    max_keys: int = 100_000
    _buckets: OrderedDict[str, tuple[TokenBucket | None, TokenBucket | None]] = field(default_factory=OrderedDict)

    @property
    def enabled(self) -> bool:
        return self.requests_per_minute > 0 or self.tokens_per_minute > 0

    @property
    def num_keys(self) -> int:
        return len(self._buckets)

    def _for(self, key: str) -> tuple[TokenBucket | None, TokenBucket | None]:
        buckets = self._buckets.get(key)
        if buckets is not None:
            self._buckets.move_to_end(key)
            return buckets
        rpm, tpm = self.requests_per_minute, self.tokens_per_minute
        buckets = (
            TokenBucket(rpm, rpm / 60) if rpm > 0 else None,
            TokenBucket(tpm, tpm / 60) if tpm > 0 else None,
        )
        if len(self._buckets) >= self.max_keys:
            self._evict()  # before adding: the new (full) bucket must not be swept at once
        self._buckets[key] = buckets
        return buckets

    def _evict(self) -> None:
        now = self.clock()
        for key in [k for k, pair in self._buckets.items() if all(b is None or b.is_full(now) for b in pair)]:
            del self._buckets[key]
        # Still full: drop the least recently used tenth, so the next sweep is far away.
        while self._buckets and len(self._buckets) >= self.max_keys * 9 // 10:
            self._buckets.popitem(last=False)

    def check_requests(self, key: str) -> None:
        """Raise 429 if `key` may send no request now; charges nothing (cheap: run it first)."""
        if self.requests_per_minute <= 0:
            return
        requests, _ = self._for(key)
        wait = requests.wait_for(1, self.clock())
        if wait > 0:
            raise self._exceeded("requests", wait, self.requests_per_minute)

    def _exceeded(self, kind: str, wait: float, limit: int) -> APIError:
        return APIError(
            429,
            f"Rate limit reached for {kind} per minute: limit {limit}. Please try again in {wait:.1f}s.",
            code="rate_limit_exceeded",
            type=kind,
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )

    def admit(self, key: str, tokens: int) -> None:
        """Charge one request of up to `tokens` tokens to `key`, or raise 429."""
        if not self.enabled:
            return
        requests, token_bucket = self._for(key)
        if token_bucket is not None and tokens > token_bucket.capacity:
            raise APIError(
                429,
                f"This request may use {tokens} tokens, more than this key's limit of {self.tokens_per_minute} "
                "tokens per minute; lower max_tokens or shorten the prompt.",
                code="rate_limit_exceeded",
                type="tokens",
            )
        now = self.clock()
        waits = []
        if requests is not None:
            waits.append(("requests", requests.wait_for(1, now), self.requests_per_minute))
        if token_bucket is not None:
            waits.append(("tokens", token_bucket.wait_for(tokens, now), self.tokens_per_minute))
        for kind, wait, limit in waits:
            if wait > 0:
                raise self._exceeded(kind, wait, limit)
        if requests is not None:
            requests.take(1)
        if token_bucket is not None:
            token_bucket.take(tokens)


@dataclass
class Drain:
    draining: bool = False
    in_progress: int = 0

    def refusal(self) -> APIError:
        return APIError(503, "The server is shutting down; send the request to another instance.", code="shutting_down")
