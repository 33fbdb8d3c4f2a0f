"""MiniMind checkpoint import/export: parity with MiniMind's own logits, exact round trips, clear errors."""

import json
from pathlib import Path

import pytest
import torch
from helpers import shared_path
from transformers import AutoModelForCausalLM

from minidpo.cli import main
from minidpo.errors import UserError
from minidpo.minimind import export_minimind, import_minimind, infer_architecture, minimind_keys

VOCAB = 48


def make_state_dict(version="minimind2", hidden=32, layers=2, heads=4, kv_heads=2, intermediate=96,
                    vocab=VOCAB, tied=True, seed=0):
    """A random fp16 state_dict laid out like MiniMind saves one (both embedding keys, even when tied)."""
    g = torch.Generator().manual_seed(seed)
    d = hidden // heads
    shapes = {"q_proj": (heads * d, hidden), "k_proj": (kv_heads * d, hidden), "v_proj": (kv_heads * d, hidden),
              "o_proj": (hidden, heads * d), "q_norm": (d,), "k_norm": (d,), "input_layernorm": (hidden,),
              "post_attention_layernorm": (hidden,), "gate_proj": (intermediate, hidden),
              "up_proj": (intermediate, hidden), "down_proj": (hidden, intermediate),
              "embed_tokens": (vocab, hidden), "norm": (hidden,), "lm_head": (vocab, hidden)}
    sd = {}
    for key in minimind_keys(version, layers):
        sd[key] = (torch.randn(shapes[key.split(".")[-2]], generator=g) * 0.1).half()
    if tied:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    return sd


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A word-level tokenizer with VOCAB tokens and MiniMind's special-token ids, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    path = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(path)
    return path


def save(sd, path):
    torch.save(sd, path)
    return path


def assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float16, k
        assert torch.equal(a[k], b[k]), k


# ---- without ../shared ----

@pytest.mark.parametrize("version,tied", [("minimind2", True), ("minimind3", True), ("minimind3", False)])
def test_synthetic_import_export_round_trip(tmp_path, tiny_tokenizer, version, tied):
    sd = make_state_dict(version, tied=tied)
    summary = import_minimind(save(sd, tmp_path / "in.pth"), tiny_tokenizer, tmp_path / "hf")
    assert summary["version"] == version
    assert (summary["num_attention_heads"], summary["num_key_value_heads"], summary["head_dim"]) == (4, 2, 8)
    assert (summary["intermediate_size"], summary["vocab_size"]) == (96, VOCAB)
    assert summary["tie_word_embeddings"] == tied

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert type(model).__name__ == {"minimind2": "LlamaForCausalLM", "minimind3": "Qwen3ForCausalLM"}[version]
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rms_norm_eps"] == (
        1e-5 if version == "minimind2" else 1e-6)

    export_minimind(tmp_path / "hf", tmp_path / "out.pth")
    exported = torch.load(tmp_path / "out.pth", weights_only=True)
    assert_same(sd, exported)
    # and back again: the re-imported weights are the first import's, bit for bit
    import_minimind(tmp_path / "out.pth", tiny_tokenizer, tmp_path / "hf2")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "hf2", dtype=torch.float32).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())


def test_head_dim_and_overrides(tmp_path, tiny_tokenizer):
    # 4 heads of 8 with 2 kv heads; with --head-dim 4 the same tensors read as 8 heads / 4 kv heads
    sd = make_state_dict("minimind2")
    assert infer_architecture(sd)["num_attention_heads"] == 4
    arch = infer_architecture(sd, head_dim=4, rope_theta=1e4, rms_norm_eps=1e-6, max_position_embeddings=2048)
    assert (arch["num_attention_heads"], arch["num_key_value_heads"], arch["head_dim"]) == (8, 4, 4)
    assert (arch["rope_theta"], arch["rms_norm_eps"], arch["max_position_embeddings"]) == (1e4, 1e-6, 2048)
    with pytest.raises(UserError, match="head_dim 5"):
        infer_architecture(sd, head_dim=5)


def test_lora_adapter_is_merged_before_export(tmp_path, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    import_minimind(save(make_state_dict("minimind3"), tmp_path / "in.pth"), tiny_tokenizer, tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    # init_lora_weights=False: random B, so the merge visibly changes the weights
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tmp_path / "base")
    merged = {k: v.half() for k, v in lora.merge_and_unload().state_dict().items()}

    export_minimind(tmp_path / "adapter", tmp_path / "out.pth")
    exported = torch.load(tmp_path / "out.pth", weights_only=True)
    assert list(exported) == minimind_keys("minimind3", 2)
    assert all(torch.equal(exported[k], merged[k]) for k in exported)
    before = torch.load(tmp_path / "in.pth", weights_only=True)
    assert not torch.equal(exported["model.layers.0.self_attn.q_proj.weight"],
                           before["model.layers.0.self_attn.q_proj.weight"])


# ---- errors: one clear message each ----

@pytest.mark.parametrize("moe_key", ["model.layers.0.mlp.experts.0.gate_proj.weight",  # both versions
                                     "model.layers.0.mlp.gate.weight",
                                     "model.layers.0.mlp.shared_experts.0.up_proj.weight"])  # MiniMind2 MoE
def test_moe_is_refused(moe_key):
    sd = make_state_dict()
    sd[moe_key] = torch.zeros(4, 32, dtype=torch.float16)
    with pytest.raises(UserError, match="MoE checkpoint.*not supported yet"):
        infer_architecture(sd)


def test_missing_key():
    sd = make_state_dict()
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(UserError, match=r"missing 1 key.*model\.layers\.1\.mlp\.up_proj\.weight"):
        infer_architecture(sd)


def test_unexpected_key():
    sd = make_state_dict()
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32, dtype=torch.float16)
    with pytest.raises(UserError, match="no dense minimind2 model has"):
        infer_architecture(sd)


def test_bad_shapes():
    sd = make_state_dict()
    sd["model.layers.1.mlp.down_proj.weight"] = torch.zeros(32, 80, dtype=torch.float16)
    with pytest.raises(UserError, match=r"fit no known minimind2 layout.*down_proj"):
        infer_architecture(sd)
    sd = make_state_dict()
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(48, 32, dtype=torch.float16)
    with pytest.raises(UserError, match="q_proj rows == hidden size"):
        infer_architecture(sd)


def test_version_conflict():
    with pytest.raises(UserError, match="it has q_norm/k_norm, so it is minimind3"):
        infer_architecture(make_state_dict("minimind3"), version="minimind2")
    with pytest.raises(UserError, match="it has no q_norm/k_norm, so it is minimind2"):
        infer_architecture(make_state_dict("minimind2"), version="minimind3")


def test_vocab_mismatch(tmp_path, tiny_tokenizer):
    ckpt = save(make_state_dict(vocab=VOCAB + 16), tmp_path / "in.pth")
    with pytest.raises(UserError, match=f"has {VOCAB} tokens but the checkpoint's embedding has {VOCAB + 16} rows"):
        import_minimind(ckpt, tiny_tokenizer, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_not_a_state_dict(tmp_path, tiny_tokenizer):
    with pytest.raises(UserError, match="does not exist"):
        import_minimind(tmp_path / "nope.pth", tiny_tokenizer, tmp_path / "hf")
    with pytest.raises(UserError, match="not a plain state_dict"):
        import_minimind(save({"step": 3}, tmp_path / "x.pth"), tiny_tokenizer, tmp_path / "hf")
    with pytest.raises(UserError, match="neither a Transformers model folder"):
        export_minimind(tmp_path, tmp_path / "out.pth")


def test_cli_prints_one_line_and_exits_2(tmp_path, tiny_tokenizer, capsys):
    sd = make_state_dict()
    sd["model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.zeros(96, 32, dtype=torch.float16)
    ckpt = save(sd, tmp_path / "moe.pth")
    rc = main(["import-minimind", str(ckpt), "--tokenizer", str(tiny_tokenizer), "--output", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("minidpo import-minimind: error: ") and "Traceback" not in err
    assert err.count("\n") == 1


def test_cli_round_trip(tmp_path, tiny_tokenizer, capsys):
    sd = make_state_dict("minimind3")
    ckpt = save(sd, tmp_path / "in.pth")
    args = ["import-minimind", str(ckpt), "--tokenizer", str(tiny_tokenizer), "--output", str(tmp_path / "hf")]
    assert main(args) == 0
    assert "detected minimind3 -> Qwen3ForCausalLM" in capsys.readouterr().out
    assert main(["export-minimind", str(tmp_path / "hf"), "--output", str(tmp_path / "out" / "dpo_512.pth")]) == 0
    assert_same(sd, torch.load(tmp_path / "out" / "dpo_512.pth", weights_only=True))


# ---- with the real MiniMind-made checkpoints in ../shared ----

@pytest.mark.parametrize("version", ["minimind2", "minimind3"])
def test_reproduces_minimind_logits(tmp_path, version):
    stem = {"minimind2": "minimind2-tiny", "minimind3": "minimind3-tiny"}[version]
    ckpt = shared_path("minimind-checkpoints", f"{stem}.pth")
    reference = torch.load(shared_path("minimind-checkpoints", f"{stem}.logits.pt"), weights_only=True)
    tokenizer = shared_path("tokenizers", version)
    made_with = json.loads(shared_path("minimind-checkpoints", f"{stem}.json").read_text())["config"]

    summary = import_minimind(ckpt, tokenizer, tmp_path / "hf")
    assert summary["version"] == version
    for key in ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "intermediate_size", "rms_norm_eps", "rope_theta", "max_position_embeddings"]:
        assert summary[key] == made_with[key], key

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        logits = model(reference["input_ids"]).logits
    assert (logits - reference["logits"]).abs().max().item() <= 1e-4
    assert (tmp_path / "hf" / "chat_template.jinja").is_file()

    export_minimind(tmp_path / "hf", tmp_path / "out.pth")
    assert_same(torch.load(ckpt, weights_only=True), torch.load(tmp_path / "out.pth", weights_only=True))


# ---- never over an output it did not make; a non-checkpoint or a failed write is one line ----

def _tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _cli(capsys, *args):
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def test_import_into_a_folder_with_files_needs_overwrite_and_then_replaces_it_whole(tmp_path, tiny_tokenizer,
                                                                                      capsys):
    from helpers import assert_one_line_error

    ckpt = save(make_state_dict("minimind3"), tmp_path / "in.pth")
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    before = _tree(tmp_path)
    args = ["import-minimind", ckpt, "--tokenizer", tiny_tokenizer, "--output", run]
    rc, err = _cli(capsys, *args)
    assert rc == 2
    assert_one_line_error(err, f"--output {run} is not empty (checkpoint-2, summary.json): pass --overwrite")
    assert _tree(tmp_path) == before
    assert _cli(capsys, *args, "--overwrite")[0] == 0
    assert not (run / "summary.json").exists() and not (run / "checkpoint-2").exists()  # no mix of two runs
    assert (run / "config.json").is_file() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_import_never_writes_over_its_inputs(tmp_path, tiny_tokenizer, capsys):
    from helpers import assert_one_line_error

    out = tmp_path / "out"
    out.mkdir()
    ckpt = save(make_state_dict(), out / "full_sft_512.pth")
    before = _tree(tmp_path)
    rc, err = _cli(capsys, "import-minimind", ckpt, "--tokenizer", tiny_tokenizer, "--output", out, "--overwrite")
    assert rc == 2
    assert_one_line_error(err, f"--output {out} holds the input {ckpt}")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("content,why", [
    (b"hello, not a checkpoint\n", "neither a zip archive nor a pickle"),
    (b"", "it is empty"),
    (None, "it is a safetensors file"),
])
def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, tiny_tokenizer, capsys, content, why):
    from helpers import assert_one_line_error

    path = tmp_path / "model.pth"
    if content is None:
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    rc, err = _cli(capsys, "import-minimind", path, "--tokenizer", tiny_tokenizer, "--output", tmp_path / "hf")
    assert rc == 2
    assert_one_line_error(err, f"{path} is not a PyTorch checkpoint", why)
    assert not (tmp_path / "hf").exists()


def test_a_checkpoint_holding_python_objects_is_one_line(tmp_path, tiny_tokenizer, capsys):
    from helpers import assert_one_line_error

    path = tmp_path / "objects.pth"
    torch.save({"model": make_state_dict(), "args": __import__("argparse").Namespace(lr=1)}, path)
    rc, err = _cli(capsys, "import-minimind", path, "--tokenizer", tiny_tokenizer, "--output", tmp_path / "hf")
    assert rc == 2
    assert_one_line_error(err, "holds Python objects besides tensors")


@pytest.fixture(scope="module")
def imported(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("imported")
    import_minimind(save(make_state_dict(), d / "in.pth"), tiny_tokenizer, d / "hf")
    return d / "hf"


def test_export_over_an_existing_file_needs_overwrite(tmp_path, imported, capsys):
    from helpers import assert_one_line_error

    target = tmp_path / "dpo_512.pth"
    target.write_bytes(b"MiniMind's own file")
    rc, err = _cli(capsys, "export-minimind", imported, "--output", target)
    assert rc == 2
    assert_one_line_error(err, f"--output {target} exists: pass --overwrite")
    assert target.read_bytes() == b"MiniMind's own file"
    assert _cli(capsys, "export-minimind", imported, "--output", target, "--overwrite")[0] == 0
    assert list(torch.load(target, weights_only=True)) == minimind_keys("minimind2", 2)


@pytest.mark.parametrize("where,needle", [
    ("folder", "is a folder: give the file to write"),
    ("read-only", "/sys/minidpo-test/dpo.pth"),  # sysfs: read-only, or refusing a new file
    ("under-a-file", "is not a writable folder"),
])
def test_export_to_a_place_it_cannot_write_is_one_line(tmp_path, imported, capsys, where, needle):
    from helpers import assert_one_line_error

    (tmp_path / "a-file").write_text("x")
    target = {"folder": tmp_path, "read-only": Path("/sys/minidpo-test/dpo.pth"),
              "under-a-file": tmp_path / "a-file" / "dpo.pth"}[where]
    before = _tree(tmp_path)
    rc, err = _cli(capsys, "export-minimind", imported, "--output", target)
    assert rc == 2
    assert_one_line_error(err, "minidpo export-minimind: error:", needle)
    assert _tree(tmp_path) == before


def test_a_full_disk_while_exporting_leaves_nothing(tmp_path, imported, capsys, monkeypatch):
    from helpers import assert_one_line_error

    def full(obj, f):
        f.write(b"PK\x03\x04 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    rc, err = _cli(capsys, "export-minimind", imported, "--output", tmp_path / "out" / "dpo_512.pth")
    assert rc == 2
    assert_one_line_error(err, "cannot write the MiniMind checkpoint to", "no space left on the device")
    assert list((tmp_path / "out").iterdir()) == []


def test_a_full_disk_while_importing_leaves_nothing(tmp_path, tiny_tokenizer, capsys, monkeypatch):
    """safetensors writes the weights with its own I/O and reports a full disk as a SafetensorError, not an
    OSError: one line all the same, no half folder, the earlier one (--overwrite) kept."""
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    from helpers import assert_one_line_error

    out = tmp_path / "hf"
    out.mkdir()
    (out / "earlier.txt").write_text("kept")

    def full(self, folder, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    before = _tree(tmp_path)
    ckpt = save(make_state_dict(), tmp_path / "in.pth")
    before[ckpt.name] = ckpt.read_bytes()
    rc, err = _cli(capsys, "import-minimind", ckpt, "--tokenizer", tiny_tokenizer, "--output", out, "--overwrite")
    assert rc == 2
    assert_one_line_error(err, f"cannot write the imported model to {out}: no space left on the device")
    assert _tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["hf", "in.pth"]
