"""The tiny random-init models and token-id batches shared by the block-sequential, distributed and
discovery tests: a Llama (hidden 32, FFN 64, 4 heads over 2 KV heads, vocabulary 64) and a GPT-2
(hidden 32, 4 heads, vocabulary 64; HF ``Conv1D`` weights)."""
from __future__ import annotations

import torch


def tiny_llama(layers: int = 2, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, vocab_size=64,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(layers: int = 2, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def token_batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    """``n`` batches of token ids, each ``[2, 12]``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 12), generator=g) for _ in range(n)]
