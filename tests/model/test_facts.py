"""The model's facts without its weights (runtime/model/facts.py): what `kvrt serve --replicas`
serves with while the replicas load. Checked against what load_checkpoint loads, for an HF
folder and for a GGUF file before and after its conversion is cached."""

from __future__ import annotations

import pytest

from kvrt.runtime.model.checkpoint import CheckpointError, load_checkpoint
from kvrt.runtime.model.facts import ModelFacts, read_model_facts
from kvrt.runtime.model.gguf_loader import cache_folder
from tests.model.test_gguf_loader import _write_gguf

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12 times 11?  Paris 😀"}]


def assert_same(facts: ModelFacts, path: str) -> None:
    checkpoint = load_checkpoint(path)
    assert (facts.name, facts.source) == (checkpoint.name, checkpoint.source)
    assert facts.config == checkpoint.config
    assert facts.tokenizer.encode_chat(CHAT) == checkpoint.tokenizer.encode_chat(CHAT)
    assert facts.tokenizer.eos_token_ids == checkpoint.tokenizer.eos_token_ids
    assert facts.tokenizer.chat_template == checkpoint.tokenizer.chat_template


def test_a_folder_s_facts_are_its_checkpoint_s(tiny_checkpoint_dir) -> None:
    folder = tiny_checkpoint_dir()
    assert_same(read_model_facts(str(folder)), str(folder))


def test_a_gguf_s_facts_before_and_after_its_conversion(tmp_path, monkeypatch,
                                                        tiny_checkpoint_dir) -> None:
    monkeypatch.setenv("KVRT_CACHE_DIR", str(tmp_path / "cache"))
    path = _write_gguf(tiny_checkpoint_dir(), tmp_path / "tiny.gguf")
    cold = read_model_facts(str(path))
    assert not cache_folder(path).exists()  # read from the GGUF: nothing converted
    assert_same(cold, str(path))  # converts and caches it
    assert cache_folder(path).is_dir()
    assert_same(read_model_facts(str(path)), str(path))  # from the cached conversion


def test_no_checkpoint_is_the_loader_s_error(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no such file or folder"):
        read_model_facts(str(tmp_path / "missing"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a .gguf"):
        read_model_facts(str(tmp_path / "weights.bin"))
