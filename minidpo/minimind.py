"""MiniMind `*.pth` checkpoints <-> Transformers folders.

MiniMind saves a plain fp16 `state_dict`. Its dense models already use Transformers' parameter names:
MiniMind2 is a Llama (`LlamaForCausalLM`), minimind-3 a Qwen3 (`Qwen3ForCausalLM`, per-head `q_norm`/`k_norm`).
So import is: infer the config from tensor shapes, load the tensors into the matching Transformers class, save;
export is the reverse with the same key names, cast to fp16.
"""

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

from minidpo import files
from minidpo.errors import UserError
from minidpo.models import first_line, load_causal_lm, load_tokenizer

# Values MiniMind's config uses that the tensors cannot tell us (MiniMindConfig defaults of each version).
VERSIONS = {
    "minimind2": dict(architecture="LlamaForCausalLM", rms_norm_eps=1e-5, rope_theta=1e6,
                      max_position_embeddings=32768),
    "minimind3": dict(architecture="Qwen3ForCausalLM", rms_norm_eps=1e-6, rope_theta=1e6,
                      max_position_embeddings=32768),
}
MINIMIND2_KV_HEADS = 2  # in every released MiniMind2 config; the shapes alone cannot tell heads from head size
MODEL_TYPES = {"llama": "minimind2", "qwen3": "minimind3"}
LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "down_proj", "up_proj"]  # MiniMind's module order, so exported files list keys as its own do


def minimind_keys(version: str, num_layers: int) -> list[str]:
    """Every key MiniMind saves for a dense model, in its order. Tied or not, both embedding keys are saved."""
    per_layer = [f"self_attn.{p}.weight" for p in ATTN]
    if version == "minimind3":
        per_layer += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    per_layer += ["input_layernorm.weight", "post_attention_layernorm.weight"]
    per_layer += [f"mlp.{p}.weight" for p in MLP]
    keys = ["model.embed_tokens.weight"]
    keys += [f"model.layers.{i}.{k}" for i in range(num_layers) for k in per_layer]
    return keys + ["model.norm.weight", "lm_head.weight"]


def _not_a_torch_file(path: Path) -> str | None:
    """Why `path` cannot be what `torch.save` writes (a zip archive, or a pickle in older torch), judged on its first
    bytes; None when it may be one. torch's own message for other files is a paragraph, or a bare KeyError."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    if len(head) == 9 and head[8:9] == b"{":  # an 8-byte header length, then the JSON header
        return "it is a safetensors file (a Transformers folder holding it is trained or exported as it is)"
    return "it is empty" if not head else "it is neither a zip archive nor a pickle, the formats torch.save writes"


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist", code="missing_path")
    what = "not a PyTorch checkpoint (MiniMind saves its weights with torch.save as out/*.pth)"
    why = _not_a_torch_file(path)
    if why:
        raise UserError(f"{path} is {what}: {why}", code="bad_checkpoint")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds Python objects besides tensors, which are not loaded (weights_only=True); "
                        "MiniMind's out/*.pth hold only tensors", code="bad_checkpoint") from None
    except Exception as e:  # noqa: BLE001 -- torch raises RuntimeError, KeyError, EOFError... for a damaged file
        raise UserError(f"{path} is {what}: torch cannot read it ({type(e).__name__}: {first_line(e)})",
                        code="bad_checkpoint") from None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]  # a MiniMind resume checkpoint ({"model", "optimizer", ...}) holds the weights under "model"
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} is not a plain state_dict of tensors (what MiniMind saves as out/*.pth)",
                        code="bad_checkpoint")
    return sd


def _check_dense(sd: dict):
    moe = sorted(k for k in sd if re.search(r"\.mlp\.(experts|shared_experts|gate)\.", k))
    if moe:
        raise UserError(
            f"this is a MiniMind MoE checkpoint ({moe[0]}, ...): not supported yet. MiniMind's MoE layers "
            "(its own router `mlp.gate`, per-expert `mlp.experts.N.*` and, in MiniMind2, `mlp.shared_experts`) "
            "route tokens differently from every Transformers MoE class, so no Transformers model reproduces them. "
            "Use a dense MiniMind checkpoint.", code="bad_checkpoint")


def detect_version(sd: dict, version=None) -> str:
    """minimind-3 is the only dense layout with per-head q_norm/k_norm."""
    found = "minimind3" if any(k.endswith("self_attn.q_norm.weight") for k in sd) else "minimind2"
    if version is not None and version not in VERSIONS:
        raise UserError(f"unknown --version {version!r}; choose one of {', '.join(VERSIONS)}", code="bad_option")
    if version is not None and version != found:
        why = "has" if found == "minimind3" else "has no"
        raise UserError(f"--version {version} does not fit this checkpoint: it {why} q_norm/k_norm, so it is {found}",
                        code="bad_checkpoint")
    return found


def infer_architecture(sd: dict, version=None, head_dim=None, rope_theta=None, rms_norm_eps=None,
                       max_position_embeddings=None) -> dict:
    """The model config a MiniMind state_dict was made with, from its key names and tensor shapes."""
    _check_dense(sd)
    version = detect_version(sd, version)
    defaults = VERSIONS[version]
    layers = sorted({int(m.group(1)) for k in sd if (m := LAYER_KEY.fullmatch(k))})
    num_layers = layers[-1] + 1 if layers else 0
    expected = minimind_keys(version, num_layers)
    missing = [k for k in expected if k not in sd]
    if missing:
        raise UserError(f"checkpoint is missing {len(missing)} key(s) a dense {version} model needs: "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}", code="bad_checkpoint")
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        raise UserError(f"checkpoint has key(s) no dense {version} model has: "
                        f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}", code="bad_checkpoint")

    if sd["model.embed_tokens.weight"].dim() != 2:
        raise UserError(f"model.embed_tokens.weight has shape {tuple(sd['model.embed_tokens.weight'].shape)}, "
                        "not (vocab, hidden): not a MiniMind layout", code="bad_checkpoint")
    vocab_size, hidden = sd["model.embed_tokens.weight"].shape
    l0 = "model.layers.0."
    q_rows, k_rows = sd[l0 + "self_attn.q_proj.weight"].shape[0], sd[l0 + "self_attn.k_proj.weight"].shape[0]
    intermediate = sd[l0 + "mlp.gate_proj.weight"].shape[0]
    if head_dim is None and version == "minimind3":
        head_dim = sd[l0 + "self_attn.q_norm.weight"].shape[0]
    elif head_dim is None:
        # MiniMind2 always has head_dim = hidden / heads, which q_proj cannot reveal (it is square);
        # k_proj can, given MiniMind2's number of kv heads.
        head_dim = k_rows // MINIMIND2_KV_HEADS
    if head_dim <= 0 or q_rows % head_dim or k_rows % head_dim or (q_rows // head_dim) % max(k_rows // head_dim, 1):
        raise UserError(f"head_dim {head_dim} does not divide q_proj ({q_rows} rows) and k_proj ({k_rows} rows) "
                        "into whole heads with heads a multiple of kv heads; pass --head-dim", code="bad_checkpoint")
    arch = dict(version=version, architecture=defaults["architecture"], vocab_size=vocab_size, hidden_size=hidden,
                num_hidden_layers=num_layers, num_attention_heads=q_rows // head_dim,
                num_key_value_heads=k_rows // head_dim, head_dim=head_dim, intermediate_size=intermediate,
                tie_word_embeddings=torch.equal(sd["model.embed_tokens.weight"], sd["lm_head.weight"]),
                rms_norm_eps=defaults["rms_norm_eps"] if rms_norm_eps is None else rms_norm_eps,
                rope_theta=defaults["rope_theta"] if rope_theta is None else rope_theta,
                max_position_embeddings=defaults["max_position_embeddings"] if max_position_embeddings is None
                else max_position_embeddings)
    if version == "minimind2" and q_rows != hidden:
        raise UserError(f"MiniMind2 needs q_proj rows == hidden size ({hidden}), found {q_rows}: "
                        "not a MiniMind2 layout", code="bad_checkpoint")
    _check_shapes(sd, arch)
    return arch


def expected_shapes(arch: dict) -> dict:
    v, h, i, d = arch["vocab_size"], arch["hidden_size"], arch["intermediate_size"], arch["head_dim"]
    q, kv = arch["num_attention_heads"] * d, arch["num_key_value_heads"] * d
    per_layer = {"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                 "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
                 "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
                 "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
                 "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i)}
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for key in minimind_keys(arch["version"], arch["num_hidden_layers"]):
        if m := LAYER_KEY.fullmatch(key):
            shapes[key] = per_layer[m.group(2)]
    return shapes


def _check_shapes(sd: dict, arch: dict):
    bad = [f"{k} {tuple(sd[k].shape)} (expected {s})" for k, s in expected_shapes(arch).items()
           if tuple(sd[k].shape) != s]
    if bad:
        raise UserError(f"tensor shapes fit no known {arch['version']} layout "
                        f"(hidden {arch['hidden_size']}, head_dim {arch['head_dim']}): {'; '.join(bad[:3])}",
                        code="bad_checkpoint")


def build_config(arch: dict, tokenizer=None):
    from transformers import LlamaConfig, Qwen3Config

    cls = LlamaConfig if arch["architecture"] == "LlamaForCausalLM" else Qwen3Config
    keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
            "tie_word_embeddings"]
    ids = {} if tokenizer is None else dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=tokenizer.pad_token_id)
    return cls(**{k: arch[k] for k in keys}, hidden_act="silu", attention_bias=False,
               architectures=[arch["architecture"]], **ids)


def _check_import_output(output_dir: Path, inputs: list, overwrite: bool) -> None:
    """Refuse an --output that holds the inputs (replacing it would delete them, whatever --overwrite says), a
    file, or a folder with anything in it unless `overwrite` (an import into it would leave a mix of two models)."""
    out = output_dir.resolve()
    for p in inputs:
        if p.resolve() == out or out in p.resolve().parents:
            raise UserError(f"--output {output_dir} holds the input {p}: choose another --output", code="output_dir")
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output {output_dir} is a file, not a folder", code="output_dir")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        held = sorted(p.name for p in output_dir.iterdir())
        raise UserError(f"--output {output_dir} is not empty ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''})"
                        ": pass --overwrite to replace it, or choose another --output", code="output_dir")


def _replace_folder(tmp: Path, output_dir: Path) -> None:
    """Put the complete folder `tmp` at `output_dir`, replacing what is there (the old one set aside, then
    deleted), so a reader never sees a mix of the two."""
    old = None
    if output_dir.exists():
        old = files.temp_sibling(output_dir.with_name(output_dir.name + ".old"))
        os.replace(output_dir, old)
    os.replace(tmp, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def import_minimind(ckpt_path, tokenizer_dir, output_dir, version=None, overwrite=False, **overrides) -> dict:
    """Write a Transformers folder (model, tokenizer, generation config) from a MiniMind checkpoint.

    The folder is written beside `output_dir` under a temporary name and renamed into place when whole; an
    `output_dir` with files in it is refused unless `overwrite` (then replaced as a whole)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    output_dir, tokenizer_dir = Path(output_dir), Path(tokenizer_dir)
    _check_import_output(output_dir, [Path(ckpt_path), tokenizer_dir], overwrite)
    sd = load_checkpoint(ckpt_path)
    arch = infer_architecture(sd, version=version, **{k: v for k, v in overrides.items() if v is not None})
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        raise UserError(f"{tokenizer_dir} is not a tokenizer folder (no tokenizer_config.json); "
                        "pass MiniMind's tokenizer folder, e.g. model/ in the MiniMind repo", code="bad_tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) != arch["vocab_size"]:
        raise UserError(f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the checkpoint's "
                        f"embedding has {arch['vocab_size']} rows: use the tokenizer this model was trained with",
                        code="bad_tokenizer")

    config = build_config(arch, tokenizer)
    # fp32 like MiniMind's own training (it loads the fp16 file into fp32 parameters), so a trainer that
    # loads this folder gets fp32 master weights; fp16 -> fp32 is exact, so nothing is lost.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    from safetensors import SafetensorError

    tmp = files.temp_sibling(output_dir)
    try:
        files.remove_orphans(output_dir.parent)  # folders of an import killed mid-write
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _replace_folder(tmp, output_dir)
    except (OSError, SafetensorError) as e:  # the weights are written by safetensors' own (Rust) I/O
        raise files.write_error("the imported model", output_dir, e, "choose another --output") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(arch, output_dir=str(output_dir))


def _load_for_export(model_dir: Path):
    """The model in `model_dir`, with a PEFT LoRA adapter merged into its base when that is what the folder holds."""
    adapter_config = model_dir / "adapter_config.json"
    if adapter_config.is_file():
        base_dir = json.loads(adapter_config.read_text()).get("base_model_name_or_path") or ""
        if not (Path(base_dir) / "config.json").is_file():
            raise UserError(f"the LoRA adapter in {model_dir} names base model {base_dir!r}, which is not a local "
                            "model folder; merging needs the base model (the folder `minidpo import-minimind` "
                            "wrote)", code="bad_model")
    elif not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is neither a Transformers model folder (config.json) "
                        "nor a LoRA adapter folder (adapter_config.json)", code="bad_model")
    model = load_causal_lm(model_dir, dtype=torch.float32)  # an adapter folder loads with its base
    return model.merge_and_unload() if adapter_config.is_file() else model


def _check_export_output(model_dir: Path, output_path: Path, overwrite: bool) -> None:
    """Refuse, before the model is loaded: a folder as --output, a file of the model folder itself, an existing
    file unless `overwrite`, and a place that cannot be written."""
    if output_path.is_dir():
        raise UserError(f"--output {output_path} is a folder: give the file to write, e.g. "
                        f"{output_path / 'dpo_512.pth'}", code="output_dir")
    if output_path.exists() and output_path.resolve().parent == model_dir.resolve() and output_path.suffix != ".pth":
        raise UserError(f"--output {output_path} is a file of the model folder itself: choose another --output",
                        code="output_dir")
    if output_path.exists() and not overwrite:
        raise UserError(f"--output {output_path} exists: pass --overwrite to replace it, or choose another --output",
                        code="output_dir")
    parent = next((p for p in output_path.absolute().parents if p.exists()), Path("/"))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {output_path}: {parent} is not a writable folder", code="output_dir")


def export_minimind(model_dir, output_path, overwrite=False) -> dict:
    """Write a model folder (or LoRA adapter, merged) as the fp16 state_dict MiniMind's scripts load; an existing
    `output_path` is replaced only with `overwrite`, atomically (a failed write leaves nothing)."""
    model_dir, output_path = Path(model_dir), Path(output_path)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir} is not a folder", code="missing_path")
    _check_export_output(model_dir, output_path, overwrite)
    model = _load_for_export(model_dir)
    config = model.config
    version = MODEL_TYPES.get(config.model_type)
    if version is None:
        raise UserError(f"{model_dir} holds a {config.model_type!r} model; MiniMind has only Llama-shaped (MiniMind2) "
                        "and Qwen3-shaped (minimind-3) dense models", code="bad_model")
    if version == "minimind2" and not config.tie_word_embeddings:
        raise UserError("MiniMind2 always ties lm_head to embed_tokens, but this model's are untied: "
                        "MiniMind would load only one of the two", code="bad_model")
    if version == "minimind2" and config.head_dim * config.num_attention_heads != config.hidden_size:
        raise UserError("MiniMind2 needs head_dim * num_attention_heads == hidden_size", code="bad_model")
    # Clone so each key owns its storage, like the independent tensors MiniMind's `v.half()` writes.
    sd = {k: v.detach().to(torch.float16).clone() for k, v in model.state_dict().items()}
    expected = minimind_keys(version, config.num_hidden_layers)
    if set(sd) != set(expected):
        extra, missing = sorted(set(sd) - set(expected)), sorted(set(expected) - set(sd))
        raise UserError(f"model keys do not map onto MiniMind's: extra {extra[:3]}, missing {missing[:3]}",
                        code="bad_model")
    try:
        with files.atomic_path(output_path) as tmp, open(tmp, "wb") as f:
            # a Python file, so a failed write is an OSError with its errno (a path gives torch's RuntimeError)
            torch.save({k: sd[k] for k in expected}, f)
    except OSError as e:
        raise files.write_error("the MiniMind checkpoint", output_path, e, "choose another --output") from None
    return dict(version=version, num_tensors=len(expected), output_path=str(output_path),
                num_parameters=sum(p.numel() for p in model.parameters()))  # counts tied weights once
