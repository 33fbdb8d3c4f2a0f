"""minidpo.models: the one tokenizer loader and the causal-LM loader, with one-line errors."""

import pytest

from helpers import save_small_model
from minidpo.errors import UserError
from minidpo.models import check_vocab, ensure_pad_token, load_causal_lm, load_tokenizer


def test_load_tokenizer_from_a_local_folder_and_its_errors(small_base, tmp_path):
    tok = load_tokenizer(small_base[0])
    assert len(tok) == len(small_base[1]) and tok.chat_template
    with pytest.raises(UserError, match="tokenizer directory not found") as e:
        load_tokenizer(tmp_path / "nowhere")
    assert e.value.code == "missing_path"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cannot load a tokenizer from") as e:
        load_tokenizer(tmp_path / "empty")
    assert e.value.code == "bad_tokenizer" and "\n" not in e.value.message


def test_pad_token_falls_back_to_eos(small_base):
    tok = load_tokenizer(small_base[0])
    assert ensure_pad_token(tok) is False  # the embedded tokenizer has one
    tok.pad_token = None
    assert ensure_pad_token(tok) is True and tok.pad_token == tok.eos_token
    tok.pad_token, tok.eos_token = None, None
    with pytest.raises(UserError, match="neither a pad nor an eos token"):
        ensure_pad_token(tok)


def test_load_causal_lm_and_vocab_check(small_base, tmp_path):
    model = load_causal_lm(small_base[0], dtype="float32")
    check_vocab(small_base[1], model)
    small = load_causal_lm(save_small_model(tmp_path / "small", vocab_size=1024))
    with pytest.raises(UserError, match="1536 tokens but the reference x's embedding has 1024 rows: pass --ref"):
        check_vocab(small_base[1], small, "the reference x", "pass --ref")
    with pytest.raises(UserError, match="cannot load the reference model from") as e:
        load_causal_lm(tmp_path, what="reference model")
    assert e.value.code == "bad_model"


def test_load_causal_lm_reads_a_lora_adapter_folder(small_base, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    base = load_causal_lm(small_base[0])
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = load_causal_lm(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, peft_model(input_ids=ids).logits)
