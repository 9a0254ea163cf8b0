"""RateLimiter's token buckets on a fake clock: allowance, refill, per-key isolation, Retry-After."""

from __future__ import annotations

import pytest

from heron.server.errors import APIError
from heron.server.limits import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refused(limiter: RateLimiter, key: str, tokens: int) -> APIError:
    with pytest.raises(APIError) as caught:
        limiter.admit(key, tokens)
    assert caught.value.status == 429 and caught.value.code == "rate_limit_exceeded"
    return caught.value


def test_requests_per_minute_refill_continuously():
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=3, clock=clock)
    for _ in range(3):
        limiter.admit("a", 0)
    error = refused(limiter, "a", 0)
    assert error.type == "requests" and error.headers["Retry-After"] == "20"  # one request per 20 s
    limiter.admit("b", 0)  # another key is untouched
    clock.now += 19.5
    refused(limiter, "a", 0)
    clock.now += 0.5
    limiter.admit("a", 0)
    clock.now += 3600  # a full bucket holds a minute's allowance, no more
    for _ in range(3):
        limiter.admit("a", 0)
    refused(limiter, "a", 0)


def test_tokens_per_minute_charge_up_front():
    clock = Clock()
    limiter = RateLimiter(tokens_per_minute=600, clock=clock)
    limiter.admit("a", 500)
    error = refused(limiter, "a", 200)  # 100 left; 100 more take 10 s at 10 tokens/s
    assert error.type == "tokens" and error.headers["Retry-After"] == "10"
    clock.now += 10
    limiter.admit("a", 200)
    too_big = refused(limiter, "b", 601)
    assert "more than this key's limit" in too_big.message and "Retry-After" not in too_big.headers


def test_disabled_limiter_admits_everything():
    limiter = RateLimiter()
    assert not limiter.enabled
    for _ in range(1000):
        limiter.admit("a", 10**9)
