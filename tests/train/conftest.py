"""Tiny random HF models (saved with save_pretrained) and a tiny built dataset."""

from __future__ import annotations

import pytest

from hllm import testing as T


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    return T.tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return T.tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def built_dir(tmp_path_factory):
    items, seqs = T.synthetic_lists(n_users=40, n_items=60, duplicate_text=True)
    return T.write_built(tmp_path_factory.mktemp("built"), items, seqs)
