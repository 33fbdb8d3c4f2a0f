"""Fixtures shared by several test files; plain helpers live in helpers.py."""

import pytest

from helpers import write_tiny_assets


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """A base model folder (`base`: tokenizer + tiny Llama) and 160 MiniMind-format pairs (`dpo.jsonl`) with a
    learnable preference. Read-only: tests that write put their outputs in their own tmp_path."""
    return write_tiny_assets(tmp_path_factory.mktemp("assets"), pairs=160, data_seed=1)
