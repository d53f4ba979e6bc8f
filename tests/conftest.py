"""Shared fixtures: a clean CKPT_* environment for every test."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _clean_ckpt_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in list(os.environ):
        if key.startswith("CKPT_"):
            monkeypatch.delenv(key)
    yield
