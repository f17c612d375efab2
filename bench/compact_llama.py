"""A Llama-architecture model compacted at local sparsity: how much of the decoder goes, whether the
compacted model equals its masked model, and whether it reloads from ``save_pretrained``.

    python bench/compact_llama.py                       # hidden 512, 8 heads, 2 KV heads, FFN 1376, 4 layers
    python bench/compact_llama.py --sparsity 0.5 --layers 2

The model is built from a ``LlamaConfig`` with random weights (never downloaded; norm weights
drawn in [0.5, 1.5] so their rescaling shows), pruned with ``1xchannel`` (``pruning_scope:
local``) and ``compact=True`` on one batch of token ids. "decoder" is ``model.layers`` (attention,
MLP and norms of every layer); the embedding and ``lm_head`` are counted apart. The compacted
model is compared with the masked model (the same transform without ``compact``) on fresh token
ids, then saved with ``save_pretrained`` and reloaded with ``from_pretrained`` and compared again.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch

import fxprune


def build(args):
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.ffn, vocab_size=args.vocab,
                                   num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.kv_heads)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.copy_(torch.rand(m.weight.shape) + 0.5)
    return model


def count(model, prefix):
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


def main():
    import transformers
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=1376)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--sparsity", type=float, default=0.3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = {"pattern": "1xchannel", "target_sparsity": args.sparsity, "pruning_scope": "local"}
    ids = torch.randint(0, args.vocab, (2, 16))
    model = build(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.process_time()
        compacted = fxprune.transform(model, config, example_inputs=(ids,), compact=True)
        seconds = time.process_time() - t0
        masked = fxprune.transform(model, config, example_inputs=(ids,))
    fresh = torch.randint(0, args.vocab, (3, 21))
    with torch.no_grad():
        ref = masked(fresh).logits
        out = compacted(fresh).logits
        err = float((out - ref).abs().max()) / float(ref.abs().max())
        with tempfile.TemporaryDirectory() as d:
            compacted.save_pretrained(d)
            again = transformers.LlamaForCausalLM.from_pretrained(d).eval()
            reload_err = float((again(fresh).logits - out).abs().max()) / float(out.abs().max())
    c = fxprune.sparsity_report(compacted).compaction
    layer = compacted.model.layers[0]
    cfg = compacted.config
    print(f"Llama hidden {args.hidden}, {args.heads} heads / {args.kv_heads} KV heads, FFN {args.ffn}, "
          f"{args.layers} layers, vocab {args.vocab}; 1xchannel local {args.sparsity}")
    print("| part | params before | params after | kept |")
    print("|---|---|---|---|")
    for name, prefix in (("decoder (model.layers)", "model.layers."), ("embed_tokens", "model.embed_tokens."),
                         ("lm_head", "lm_head."), ("whole model", "")):
        b, a = count(model, prefix), count(compacted, prefix)
        print(f"| {name} | {b:,} | {a:,} | {a / b:.1%} |")
    print()
    print(f"config after: hidden_size {cfg.hidden_size}, intermediate_size {cfg.intermediate_size}, "
          f"num_attention_heads {cfg.num_attention_heads}, num_key_value_heads {cfg.num_key_value_heads}, "
          f"head_dim {cfg.head_dim}, rms_norm_eps {cfg.rms_norm_eps:.4g}")
    print(f"layer 0: q_proj {tuple(layer.self_attn.q_proj.weight.shape)}, k_proj "
          f"{tuple(layer.self_attn.k_proj.weight.shape)}, up_proj {tuple(layer.mlp.up_proj.weight.shape)}")
    blocked = sum(g["blocked_units"] for g in c["groups"])
    units = sum(g["units"] for g in c["groups"])
    reasons = {b["reason"] for g in c["groups"] for b in g["blocked"]}
    print(f"channel units {units}, blocked {blocked}" + (f" (e.g. {sorted(reasons)[0]})" if reasons else ""))
    print(f"compacted vs masked on fresh ids: max |diff| / max |logit| = {err:.2e}")
    print(f"from_pretrained(save_pretrained) vs compacted: {reload_err:.2e}; "
          f"config not describing: {c['config']['not_described'] or 'none'}")
    print(f"transform (compact=True) CPU time: {seconds:.1f} s")


if __name__ == "__main__":
    main()
