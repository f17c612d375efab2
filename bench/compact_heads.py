"""Attention heads removed by compaction on mid-size transformer configs (random weights, built from
configs: no download): `1xchannel` at a target sparsity, `compact=True`; per model the parameters
kept, the channel units (coupled classes) and how many are blocked, the attention heads and
key/value heads before -> after (summed over layers), and whether the compacted model equals the
masked one on fresh inputs (rtol 1e-4).

    python bench/compact_heads.py                       # every model, local 0.3
    python bench/compact_heads.py --models llama-gqa2 --scope global
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

import fxprune


def _decoder(kind, heads, kv_heads, hidden=512, layers=4):
    import transformers
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]
    cfg = config_class(hidden_size=hidden, intermediate_size=4 * hidden, vocab_size=1000, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads)
    return model_class(cfg), lambda: (torch.randint(0, 1000, (1, 32)),)


def _t5():
    import transformers
    cfg = transformers.T5Config(d_model=512, d_kv=64, d_ff=2048, num_layers=4, num_heads=8, vocab_size=1000)
    return transformers.T5Model(cfg), lambda: {"input_ids": torch.randint(0, 1000, (1, 32)),
                                               "decoder_input_ids": torch.randint(0, 1000, (1, 16))}


def _vit():
    import transformers
    cfg = transformers.ViTConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
                                 image_size=64, patch_size=16)
    return transformers.ViTModel(cfg), lambda: (torch.randn(1, 3, 64, 64),)


class _PackedBlock(nn.Module):
    """timm's ViT attention (one qkv projection, reshape / permute / unbind) and MLP, pre-norm."""

    def __init__(self, dim=384, heads=6):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, -1)
        x = x + self.proj(a)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


def _packed():
    model = nn.Sequential(nn.Linear(64, 384), *[_PackedBlock() for _ in range(4)], nn.Linear(384, 10))
    return model, lambda: (torch.randn(1, 16, 64),)


def _mha():
    layer = nn.TransformerEncoderLayer(384, 6, 1536, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(64, 384), nn.TransformerEncoder(layer, 4, enable_nested_tensor=False),
                          nn.Linear(384, 10))
    return model, lambda: (torch.randn(1, 16, 64),)


MODELS = {
    "llama-gqa2": lambda: _decoder("llama", 8, 2),
    "llama-gqa4": lambda: _decoder("llama", 8, 4),
    "llama-mha": lambda: _decoder("llama", 8, 8),
    "qwen2-gqa4": lambda: _decoder("qwen2", 8, 4),
    "mistral-gqa2": lambda: _decoder("mistral", 8, 2),
    "t5": _t5,
    "vit": _vit,
    "timm-packed-qkv": _packed,
    "nn.TransformerEncoder": _mha,
}


def heads_of(model) -> tuple[int, int]:
    """(query heads, key/value heads) summed over the attention modules, read from the shapes."""
    q = kv = 0
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            n = m.in_proj_weight.shape[0] // 3 // m.head_dim
            q, kv = q + n, kv + n
        elif hasattr(m, "q_proj") and hasattr(m, "k_proj") and hasattr(m, "head_dim"):
            q += m.q_proj.out_features // m.head_dim
            kv += m.k_proj.out_features // m.head_dim
        elif hasattr(m, "relative_attention_num_buckets") and hasattr(m, "key_value_proj_dim"):  # T5
            n = m.q.out_features // m.key_value_proj_dim
            q, kv = q + n, kv + n
        elif hasattr(m, "query") and hasattr(m, "attention_head_size"):  # HF ViT / BERT
            n = m.query.out_features // m.attention_head_size
            q, kv = q + n, kv + n
        elif isinstance(m, _PackedBlock):
            n = m.qkv.out_features // 3 // m.head_dim
            q, kv = q + n, kv + n
    return q, kv


def first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0])
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def run(name, sparsity, scope):
    torch.manual_seed(0)
    model, make_inputs = MODELS[name]()
    model.eval()
    inputs = make_inputs()
    config = {"pattern": "1xchannel", "target_sparsity": sparsity, "pruning_scope": scope}
    before = heads_of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        masked = fxprune.transform(model, config, inputs)
        start = time.process_time()
        compacted = fxprune.transform(model, config, inputs, compact=True)
        cpu = time.process_time() - start
    report = fxprune.sparsity_report(compacted).compaction
    units = sum(g["units"] for g in report["groups"])
    blocked = sum(g["blocked_units"] for g in report["groups"])
    reasons = sorted({b["reason"].split(":")[0] for g in report["groups"] for b in g["blocked"]})
    fresh = make_inputs()
    with torch.no_grad():
        call = (lambda m: m(**fresh)) if isinstance(fresh, dict) else (lambda m: m(*fresh))
        a, b = first_tensor(call(masked)), first_tensor(call(compacted))
    equal = a.shape == b.shape and torch.allclose(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    after = heads_of(compacted)
    return {"model": name, "params (M)": report["params_before"] / 1e6,
            "kept": report["params_after"] / report["params_before"], "units": units, "blocked": blocked,
            "heads": f"{before[0]} -> {after[0]}", "kv heads": f"{before[1]} -> {after[1]}",
            "equal": equal, "cpu s": cpu, "blocked by": "; ".join(reasons)[:90]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--scope", default="local", choices=("local", "global"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"1xchannel, target {args.sparsity}, {args.scope}; heads summed over layers")
    print("| model | params (M) | params kept | channel units | blocked | heads | kv heads | compacted == masked | transform CPU s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        r = run(name, args.sparsity, args.scope)
        print(f"| {r['model']} | {r['params (M)']:.2f} | {r['kept']:.1%} | {r['units']} | {r['blocked']} "
              f"({r['blocked'] / max(r['units'], 1):.1%}) | {r['heads']} | {r['kv heads']} | {r['equal']} | {r['cpu s']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
