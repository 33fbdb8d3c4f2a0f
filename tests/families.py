"""Tiny models of the decoder-only families a TRL user brings, each with what changes attention or token mixing
switched on: sliding windows shorter than the test sequences, attention sinks, ALiBi, softcapping, NoPE layers,
positions derived from the attention mask, Mamba / short-conv / linear-attention layers, MoE routing.

`build(family, vocab, pad, seed)` makes one from its config (fp32, random weights, fixed seed): nothing is downloaded.
"""

from __future__ import annotations

WINDOW = 16  # shorter than every test sequence (60-200 tokens)

# initializer_range 0.2 (10x the usual): token mixing strong enough that a fast path mixing the wrong tokens moves the
# log-probs by far more than the tests' 1e-5 (Falcon-H1's Mamba branch: 6e-6 at 0.02, 3e-2 at 0.2)
_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=1024, initializer_range=0.2)
_MOE = dict(moe_intermediate_size=32, num_experts_per_tok=2)

# family -> (model_type, config overrides); None in an override removes a common key the family does not take
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "qwen2-sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0,
                                    layer_types=["sliding_attention", "sliding_attention"])),
    "qwen2-moe": ("qwen2_moe", dict(num_experts=4, shared_expert_intermediate_size=32, **_MOE)),
    "qwen3": ("qwen3", {}),
    "qwen3-moe": ("qwen3_moe", dict(num_experts=4, **_MOE)),
    "mistral-sliding": ("mistral", dict(sliding_window=WINDOW)),
    "mixtral-sliding": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)),
    "gemma": ("gemma", {}),
    "gemma2-softcap-sliding": ("gemma2", dict(sliding_window=WINDOW, attn_logit_softcapping=50.0,
                                              final_logit_softcapping=30.0)),
    "gemma3-local-global": ("gemma3_text", dict(sliding_window=WINDOW, layer_types=["sliding_attention",
                                                                                      "full_attention"])),
    "cohere": ("cohere", {}),
    "cohere2-sliding": ("cohere2", dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("phi3", {}),
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=1024,
                        **{k: None for k in _COMMON if k != "initializer_range"})),
    # OPT drops out with functional calls (no nn.Dropout module for disable_dropout to find): set to 0 here
    "opt": ("opt", dict(ffn_dim=64, word_embed_proj_dim=32, num_key_value_heads=None, head_dim=None,
                        intermediate_size=None, dropout=0.0, attention_dropout=0.0, layerdrop=0.0)),
    "bloom": ("bloom", dict(n_layer=2, n_head=4,
                          **{k: None for k in _COMMON if k not in ("hidden_size", "initializer_range")})),
    "mpt": ("mpt", dict(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=1024,
                        attn_config={"alibi": True}, **{k: None for k in _COMMON})),
    "falcon-alibi": ("falcon", dict(alibi=True, new_decoder_architecture=False, multi_query=True,
                                    num_key_value_heads=None, head_dim=None, intermediate_size=None)),
    "gpt-oss-sinks": ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
                                      layer_types=["sliding_attention", "full_attention"], head_dim=8)),
    "smollm3-nope": ("smollm3", dict(no_rope_layers=[1, 0], no_rope_layer_interval=2)),
    "olmo2": ("olmo2", {}),
    "lfm2-conv": ("lfm2", dict(layer_types=["conv", "full_attention"], block_ff_dim=64, norm_eps=1e-5)),
    "nemotron-h-mamba": ("nemotron_h", dict(hybrid_override_pattern="M*", layers_block_type=["mamba", "attention"],
                                            mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=1,
                                            chunk_size=16)),
    "falcon-h1": ("falcon_h1", dict(mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8,
                                    mamba_n_groups=1, mamba_chunk_size=16)),
    "jamba": ("jamba", dict(num_experts=2, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1,
                            expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_expand=2,
                            mamba_dt_rank=4)),
    "qwen3-next-linear": ("qwen3_next", dict(layer_types=["linear_attention", "full_attention"], num_experts=4,
                                             linear_num_value_heads=4, linear_num_key_heads=2,
                                             linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
                                             shared_expert_intermediate_size=32, **_MOE)),
    "deepseek-v3": ("deepseek_v3", dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1,
                                        topk_group=1, first_k_dense_replace=1, moe_intermediate_size=32,
                                        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                        v_head_dim=8, head_dim=None, num_key_value_heads=4)),
}


def build(family: str, vocab: int, pad: int, bos: int, eos: int, seed: int = 0):
    """The tiny fp32 model of `family`, eager-free (sdpa where the family has it), initialised with `seed`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides = FAMILIES[family]
    kwargs = {**_COMMON, **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    config = AutoConfig.for_model(model_type, vocab_size=vocab, pad_token_id=pad, bos_token_id=bos,
                                  eos_token_id=eos, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()
