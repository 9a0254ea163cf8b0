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


def test_the_bucket_map_is_bounded_and_drops_refilled_buckets_first():
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=2, clock=clock, max_keys=100)
    for i in range(99):
        limiter.admit(f"made-up-{i}", 0)
    clock.now += 120  # those have refilled: as good as new, so dropping them loses nothing
    limiter.admit("busy", 0)
    limiter.admit("busy", 0)
    limiter.admit("one-more", 0)  # 101 keys: the sweep runs
    assert limiter.num_keys == 2
    refused(limiter, "busy", 0)  # an empty bucket is kept
    for i in range(1000):  # and with nothing refilled, the least recently used go
        limiter.admit(f"flood-{i}", 0)
        assert limiter.num_keys <= 100


def test_check_requests_refuses_without_charging():
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=1, clock=clock)
    limiter.check_requests("a")
    limiter.check_requests("a")  # checking takes nothing
    limiter.admit("a", 0)
    with pytest.raises(APIError) as caught:
        limiter.check_requests("a")
    assert caught.value.status == 429 and caught.value.headers["Retry-After"] == "60"
