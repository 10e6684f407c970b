"""Tests never write the user's cache: even module-scoped fixtures, built before any test's own fixtures, see the session's."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def cache_seen_by_a_module_fixture() -> str | None:
    return os.environ.get("PUZZLE_CACHE")


def test_module_fixtures_already_use_the_sessions_cache(cache_seen_by_a_module_fixture, session_cache):
    assert cache_seen_by_a_module_fixture == str(session_cache)
