"""Hugging Face transformers models (random init from a config, no download) through torch.export."""
import pytest
import torch

import fxprune

transformers = pytest.importorskip("transformers")

TINY = dict(num_hidden_layers=2, num_attention_heads=4)


def _bert():
    cfg = transformers.BertConfig(hidden_size=64, intermediate_size=128, vocab_size=100, **TINY)
    return transformers.BertForSequenceClassification(cfg), (torch.randint(0, 100, (2, 8)),)


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg), (torch.randint(0, 100, (2, 8)),)


def _vit():
    cfg = transformers.ViTConfig(hidden_size=64, intermediate_size=128, image_size=32, patch_size=8, **TINY)
    return transformers.ViTModel(cfg), (torch.randn(1, 3, 32, 32),)


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, vocab_size=100,
                                   num_key_value_heads=2, **TINY)
    return transformers.LlamaForCausalLM(cfg), (torch.randint(0, 100, (2, 8)),)


MODELS = {"bert": _bert, "gpt2": _gpt2, "vit": _vit, "llama": _llama}
# (prunable targets found, excluded last linear)
EXPECTED = {"bert": (14, "classifier"), "gpt2": (9, "transformer.wte"), "vit": (14, "pooler.dense"),
            "llama": (15, "lm_head")}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("pattern,target", [("4x1", 0.8), ("2:4", 0.5)])
def test_hf_models_prune_exactly_and_keep_their_class(name, pattern, target):
    model, inputs = MODELS[name]()
    model.eval()
    pruned = fxprune.transform(model, {"target_sparsity": target, "pattern": pattern}, example_inputs=inputs)
    assert type(pruned) is type(model)
    report = fxprune.sparsity_report(pruned)
    n_targets, last = EXPECTED[name]
    assert len(report.layers) == n_targets
    assert report.layer(last).status.startswith("excluded: last linear")
    pruned_layers = report.pruned_layers
    assert len(pruned_layers) == n_targets - 1
    params = dict(pruned.named_parameters())
    zeros = sum(int((params[r.param] == 0).sum()) for r in pruned_layers)
    total = sum(r.numel for r in pruned_layers)
    block = 4 if pattern == "4x1" else 2
    assert zeros == int(target * total) // block * block
    if pattern == "2:4":  # every layer exactly 2:4 along its input dimension
        for r in pruned_layers:
            w = params[r.param]
            view = w.t() if r.module_type == "Conv1D" else w.reshape(w.shape[0], -1)
            if r.module_type == "Conv2d":
                view = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
            assert ((view == 0).reshape(-1, 4).sum(1) == 2).all(), r.name
    with torch.no_grad():
        out = pruned(*inputs)
    first = out[0] if isinstance(out, tuple) else next(iter(out.values()))
    assert torch.isfinite(first).all()


def test_hf_model_kwargs_inputs_tied_lm_head_and_save_pretrained(tmp_path):
    model, (ids,) = _gpt2()
    model.eval()
    pruned = fxprune.transform(model, {"target_sparsity": 0.5, "pattern": "1x1",
                                       "exclude_last_linear": False, "op_names": ["lm_head"]},
                               example_inputs={"input_ids": ids})
    report = fxprune.sparsity_report(pruned)
    # lm_head is tied to the token embedding: one target, found through its alias, pruned once
    assert [r.name for r in report.pruned_layers] == ["transformer.wte"]
    assert report.layer("lm_head") is report.layer("transformer.wte")
    assert pruned.lm_head.weight is pruned.transformer.wte.weight
    assert int((pruned.lm_head.weight == 0).sum()) == 100 * 64 // 2
    pruned.save_pretrained(tmp_path)
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert torch.equal(again.lm_head.weight, pruned.lm_head.weight)


def test_hf_model_without_example_inputs_says_what_to_pass():
    model, _ = _bert()
    with pytest.raises(fxprune.CaptureError, match=r"Pass example_inputs="):
        fxprune.transform(model, {"pattern": "4x1"})
