"""Waiting in a test for something another process does: one poll loop for every module."""
from __future__ import annotations

import time

import pytest

WAIT_S = 60  # the default bound on a wait (the machine is shared, so generous)


def wait_for(predicate, what: str, timeout: float = WAIT_S, every: float = 0.25):
    """Poll `predicate` until it returns something truthy and return that; fail saying
    `what` was not seen within `timeout` seconds otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:.0f} s: {what}")
        time.sleep(every)
