"""Tiny random decoders of the model families patchsparse supports, built in code (no downloads).

Each is a few thousand parameters, dimensions multiples of 16 so that 16x16 tiles and 2:4 fit.
"""

from __future__ import annotations

import torch

VOCAB = 320

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=256)


def _config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**_COMMON, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "qwen2":  # biases on q/k/v, untied head
        return tf.Qwen2Config(**_COMMON, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=False)
    if family == "opt":  # biases everywhere, learned positions, fc1/fc2
        return tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=256)
    if family == "gpt-neox":  # fused query_key_value projection, untied embed_out
        return tf.GPTNeoXConfig(**_COMMON, intermediate_size=128, rotary_pct=0.5, tie_word_embeddings=False)
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**_COMMON, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=False,
                             pad_token_id=0)
    if family == "gemma3-mixed":  # sliding-window and full attention interleaved
        return tf.Gemma3TextConfig(**_COMMON, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                   sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                                   tie_word_embeddings=True)
    if family == "mixtral":  # mixture of experts: 4 experts, 2 per token
        return tf.MixtralConfig(**_COMMON, intermediate_size=64, num_key_value_heads=2, num_local_experts=4,
                                num_experts_per_tok=2, tie_word_embeddings=False)
    if family == "qwen2-moe":  # routed experts, a shared expert and its sigmoid gate
        return tf.Qwen2MoeConfig(**_COMMON, intermediate_size=128, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                 num_key_value_heads=2, decoder_sparse_step=1, tie_word_embeddings=False)
    raise KeyError(family)


FAMILIES = ("llama", "qwen2", "opt", "gpt-neox", "phi3", "gemma3-mixed", "mixtral", "qwen2-moe")
MOE = ("mixtral", "qwen2-moe")


def build_family(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM of `family`, frozen, in eval mode, experts unfused into linears."""
    from transformers import AutoModelForCausalLM

    from patchsparse.models.experts import unfuse_experts

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family)).eval()
    model.requires_grad_(False)
    unfuse_experts(model)
    return model
