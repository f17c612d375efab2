"""Checkpoint to checkpoint (fxprune.prune_checkpoint / `fxprune prune HF_DIR --out`): the pruned
directory equals fxprune.transform on the loaded model, bit for bit; bad input leaves nothing."""
import json
import struct

import pytest
import torch

import fxprune
from fxprune.checkpoint import REPORT_FILE, CheckpointError
from fxprune.cli import main

transformers = pytest.importorskip("transformers")

VOCAB = 96


def _llama():
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, vocab_size=VOCAB,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=64)


def _gpt2():  # tied lm_head / wte, HF Conv1D weights ([in, out])
    return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                                   bos_token_id=0, eos_token_id=0)


CONFIGS = {"llama": _llama, "gpt2": _gpt2}


def _save(config, path, *, coarse=True, dtype=torch.float32, shard="40KB"):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval().to(dtype)
    if coarse:  # few distinct values: the global threshold falls in ties spread over many layers
        with torch.no_grad():
            for p in model.parameters():
                p.copy_((p / 0.005).round() * 0.005)
    model.save_pretrained(path, max_shard_size=shard)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: _save(make(), root / name) for name, make in CONFIGS.items()}


def _in_memory(src, config):
    model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    ids = torch.zeros(1, 8, dtype=torch.long)
    return fxprune.transform(model, config, example_inputs=(ids,))


def _assert_same_weights(expected, out_dir):
    got = transformers.AutoModelForCausalLM.from_pretrained(out_dir).state_dict()
    want = expected.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype
        # bit for bit, -0.0 included
        assert torch.equal(got[key].view(torch.uint8), value.view(torch.uint8)), key


GLOBAL_1X1 = {"target_sparsity": 0.6, "pattern": "1x1", "pruning_scope": "global"}
CASES = {
    "2:4 local": {"target_sparsity": 0.5, "pattern": "2:4"},
    "unstructured local": {"target_sparsity": 0.55, "pattern": "1x1"},
    "unstructured global": GLOBAL_1X1,
    "unstructured global, last linear too": {**GLOBAL_1X1, "exclude_last_linear": False},
    "2:4 global below N/M": {"target_sparsity": 0.3, "pattern": "2:4", "pruning_scope": "global"},
    "4x1 global, capped, last linear too": {"target_sparsity": 0.6, "pattern": "4x1", "pruning_scope": "global",
                                            "max_sparsity_ratio_per_op": 0.7, "exclude_last_linear": False},
}


@pytest.mark.parametrize("model,case", [("llama", c) for c in CASES if c != "unstructured local"] + [
    ("gpt2", "unstructured local"), ("gpt2", "unstructured global"), ("gpt2", "4x1 global, capped, last linear too")])
def test_checkpoint_equals_in_memory_transform(checkpoints, tmp_path, model, case):
    src, config = checkpoints[model], CASES[case]
    report = fxprune.prune_checkpoint(src, config, tmp_path / "out")
    expected = _in_memory(src, config)
    _assert_same_weights(expected, tmp_path / "out")
    want = fxprune.sparsity_report(expected)
    assert [(r.param, r.status, r.zeros) for r in report.layers] == \
           [(r.param, r.status, r.zeros) for r in want.layers]
    assert report.pruned_layers and report.sparsity > 0
    saved = fxprune.SparsityReport.from_json(tmp_path / "out" / REPORT_FILE)
    assert saved.totals() == report.totals()


def test_global_ties_are_split_across_layers(checkpoints):
    # The coarse weights make the global threshold a tie that only some of the tied weights take:
    # the equality above then checks the tie order (lowest global index first), not only values.
    original = dict(transformers.AutoModelForCausalLM.from_pretrained(checkpoints["llama"]).named_parameters())
    report = fxprune.sparsity_report(_in_memory(checkpoints["llama"], GLOBAL_1X1))
    values = torch.cat([original[r.param].detach().abs().reshape(-1) for r in report.pruned_layers])
    k = sum(r.zeros for r in report.pruned_layers)
    kth = torch.sort(values).values[k - 1]
    assert kth > 0 and int((values < kth).sum()) < k < int((values <= kth).sum())


def test_global_1x1_in_row_pieces_equals_in_memory(checkpoints, tmp_path, monkeypatch):
    # Pieces of 15 rows of 64 (7 of 128): the selection passes and the writes work piece by piece,
    # the tie split crosses pieces, a capped layer is selected by itself; same bits, fewer bytes
    # held at once.
    import fxprune.checkpoint.sharded as sharded
    from fxprune.checkpoint.shards import ShardSet
    src = checkpoints["llama"]
    config = {**GLOBAL_1X1, "max_sparsity_ratio_per_op": 0.62}
    largest, read = [], ShardSet._read

    def counted(entry, begin, end):
        largest.append(end - begin)
        return read(entry, begin, end)
    monkeypatch.setattr(ShardSet, "_read", staticmethod(counted))
    monkeypatch.setattr(sharded, "PIECE_ELEMENTS", 1000)
    report = fxprune.prune_checkpoint(src, config, tmp_path / "out")
    expected = _in_memory(src, config)
    _assert_same_weights(expected, tmp_path / "out")
    assert [(r.param, r.zeros) for r in report.layers] == \
           [(r.param, r.zeros) for r in fxprune.sparsity_report(expected).layers]
    capped = [r for r in report.pruned_layers if r.zeros == int(0.62 * r.numel)]
    assert capped and len(capped) < len(report.pruned_layers)
    assert max(largest) == 15 * 64 * 4     # float32 rows of 64 entries, 15 per piece at most


def test_shard_layout_index_and_side_files_are_kept(checkpoints, tmp_path):
    src = checkpoints["llama"]
    (src / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    fxprune.prune_checkpoint(src, {"target_sparsity": 0.5, "pattern": "2:4"}, tmp_path / "out")
    out = tmp_path / "out"
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert (out / "model.safetensors.index.json").read_text() == (src / "model.safetensors.index.json").read_text()
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    for shard in shards:  # same header (same tensors, dtypes, offsets), same size
        assert (out / shard).stat().st_size == (src / shard).stat().st_size
        assert _header(out / shard) == _header(src / shard)
    assert not list(tmp_path.glob(".out.partial-*"))


def _header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def test_single_file_bf16_checkpoint(tmp_path):
    src = _save(_llama(), tmp_path / "src", coarse=False, dtype=torch.bfloat16, shard="10GB")
    assert (src / "model.safetensors").is_file()
    config = {"target_sparsity": 0.5, "pattern": "1x1", "pruning_scope": "global"}
    fxprune.prune_checkpoint(src, config, tmp_path / "out")
    expected = _in_memory(src, config)
    assert expected.dtype == torch.bfloat16
    _assert_same_weights(expected, tmp_path / "out")


def test_tied_embedding_pruned_once_and_loaded_tied(checkpoints, tmp_path):
    config = {"target_sparsity": 0.5, "pattern": "2:4", "exclude_last_linear": False}
    report = fxprune.prune_checkpoint(checkpoints["gpt2"], config, tmp_path / "out")
    tied = report.layer("lm_head")
    assert tied.param == "transformer.wte.weight" and tied.pruned and tied.aliases == ["lm_head"]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    groups = model.lm_head.weight.detach().reshape(-1, 4)   # lm_head is an nn.Linear: [out, in]
    assert bool(((groups == 0).sum(dim=1) >= 2).all()) and int((groups == 0).sum()) == tied.zeros


def test_op_names_and_excluded_select_as_in_memory(checkpoints, tmp_path):
    config = {"target_sparsity": 0.5, "pattern": "2:4", "op_names": ["mlp"], "excluded_op_names": ["layers.1"]}
    report = fxprune.prune_checkpoint(checkpoints["llama"], config, tmp_path / "out")
    assert [r.name for r in report.pruned_layers] == [f"model.layers.0.mlp.{n}_proj" for n in ("gate", "up", "down")]
    _assert_same_weights(_in_memory(checkpoints["llama"], config), tmp_path / "out")


def test_progress_is_reported_per_block(checkpoints, tmp_path):
    calls = []
    fxprune.prune_checkpoint(checkpoints["llama"], {"target_sparsity": 0.5, "pattern": "2:4"},
                             tmp_path / "out", progress=lambda *a: calls.append(a))
    assert calls == [("prune", 1, 2), ("prune", 2, 2)]


def test_cli_prunes_a_directory(checkpoints, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("target_sparsity: 0.5\npattern: '2:4'\n")
    assert main(["prune", str(checkpoints["llama"]), "--config", str(cfg), "--out", str(tmp_path / "out"),
                 "--quiet"]) == 0
    _assert_same_weights(_in_memory(checkpoints["llama"], str(cfg)), tmp_path / "out")
    capsys.readouterr()
    assert main(["prune", str(checkpoints["llama"]), "--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "exists" in err and str(tmp_path / "out") in err
    # a --report that cannot be written is refused before the run: no pruned directory appears
    for report, words in ((tmp_path / "no" / "r.json", "does not exist"), (tmp_path / "r.txt", "should end in .json")):
        assert main(["prune", str(checkpoints["llama"]), "--config", str(cfg), "--out",
                     str(tmp_path / "out2"), "--report", str(report), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--report" in err and words in err
        assert not (tmp_path / "out2").exists()


# ---------------------------------------------------------------------- bad input
TWO_FOUR = {"target_sparsity": 0.5, "pattern": "2:4"}


def _fails(src, tmp_path, match, config=TWO_FOUR, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(fxprune.FxPruneError, match=match) as info:
        fxprune.prune_checkpoint(src, config, out, **kwargs)
    assert "\n" not in str(info.value)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    return str(info.value)


def test_not_a_model_directory(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "weights.txt").write_text("x")
    _fails(tmp_path / "src", tmp_path, r"src is not a Hugging Face model directory: it has no config.json")


def test_missing_shard(checkpoints, tmp_path):
    import shutil
    src = tmp_path / "src"
    shutil.copytree(checkpoints["llama"], src)
    victim = sorted(src.glob("model-*.safetensors"))[1]
    victim.unlink()
    _fails(src, tmp_path, f"shard {victim.name} named in model.safetensors.index.json is missing")


def test_weight_in_a_dtype_that_cannot_be_pruned(checkpoints, tmp_path):
    import shutil
    from safetensors.torch import load_file, save_file
    src = tmp_path / "src"
    shutil.copytree(checkpoints["llama"], src)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.1.mlp.up_proj.weight"
    shard = src / index[key]
    tensors = load_file(shard)
    tensors[key] = tensors[key].to(torch.int8)
    save_file(tensors, shard, metadata={"format": "pt"})
    _fails(src, tmp_path, f"{shard.name}: tensor '{key}' is stored as I8")


def test_output_directory_exists_or_has_no_parent(checkpoints, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="out exists; remove it"):
        fxprune.prune_checkpoint(checkpoints["llama"], TWO_FOUR, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(CheckpointError, match="nowhere does not exist"):
        fxprune.prune_checkpoint(checkpoints["llama"], TWO_FOUR, tmp_path / "nowhere" / "out")


def test_failure_while_writing_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    from fxprune.checkpoint import shards

    written = []

    def write_then_fail(self, key, tensor):
        if written:
            raise OSError("No space left on device")
        written.append(key)
        original(self, key, tensor)

    original = shards.ShardWriter.write
    monkeypatch.setattr(shards.ShardWriter, "write", write_then_fail)
    with pytest.raises(OSError):
        fxprune.prune_checkpoint(checkpoints["llama"], TWO_FOUR, tmp_path / "out")
    assert written and not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_calibration_the_model_rejects(checkpoints, tmp_path):
    wanda = {"target_sparsity": 0.5, "pattern": "2:4", "pruning_type": "activation", "pruning_scope": "local"}
    _fails(checkpoints["gpt2"], tmp_path, r"scores from calibration data; pass calibration", config=wanda)
    too_long = tmp_path / "ids.pt"
    torch.save(torch.randint(0, VOCAB, (2, 40)), too_long)
    _fails(checkpoints["gpt2"], tmp_path, r"ids.pt, batch 0 has sequences of 40 tokens; the model takes "
           r"at most 32 \(n_positions in config.json\)", config=wanda, calibration=too_long)
    _fails(checkpoints["gpt2"], tmp_path, r"token ids in \[0, 500\]; the vocabulary is \[0, 96\)",
           config=wanda, calibration=torch.tensor([[0, 500]]))
    _fails(checkpoints["gpt2"], tmp_path, r"is torch.float32; token ids are an integer tensor",
           config=wanda, calibration=[torch.zeros(1, 4)])


def test_training_criteria_are_refused(checkpoints, tmp_path):
    _fails(checkpoints["llama"], tmp_path, r"pruning_type 'snip_momentum' is not available for checkpoints",
           config={"target_sparsity": 0.5, "pattern": "2:4", "pruning_type": "snip_momentum"})


# ---------------------------------------------------------------------- data-aware criteria
@pytest.mark.parametrize("model,criterion,pattern,extra", [
    ("llama", "activation", "2:4", {}), ("gpt2", "activation", "1x1", {}), ("llama", "sparse_gpt", "2:4", {}),
    ("gpt2", "sparse_gpt", "1x1", {"true_sequential": True})])
def test_calibrated_checkpoint_equals_in_memory_block_sequential(checkpoints, tmp_path, model, criterion, pattern, extra):
    config = {"target_sparsity": 0.5, "pattern": pattern, "pruning_type": criterion, "pruning_scope": "local",
              **extra}
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (6, 16))
    torch.save(ids, tmp_path / "ids.pt")
    ticks = []
    report = fxprune.prune_checkpoint(checkpoints[model], config, tmp_path / "out",
                                      calibration=tmp_path / "ids.pt", progress=lambda *a: ticks.append(a))
    assert ticks == [("blocks", 1, 2), ("blocks", 2, 2)]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(checkpoints[model]).eval()
    expected = fxprune.transform(loaded, config, example_inputs=(ids[:1, :8],), calibration=[ids])
    _assert_same_weights(expected, tmp_path / "out")
    assert [(r.param, r.status, r.zeros) for r in report.layers] == \
           [(r.param, r.status, r.zeros) for r in fxprune.sparsity_report(expected).layers]


def test_calibrated_checkpoint_needs_block_local_groups(checkpoints, tmp_path):
    ids = torch.randint(0, VOCAB, (2, 8))
    _fails(checkpoints["llama"], tmp_path, r"pruning_configs\[0\]: global scope ranks all layers at once; use local",
           config={"target_sparsity": 0.5, "pattern": "2:4", "pruning_type": "activation"}, calibration=ids)
    _fails(checkpoints["llama"], tmp_path, r"mixes 'magnitude' with data-aware groups", calibration=ids,
           config={"pruning_configs": [
               {"op_names": ["mlp"], "target_sparsity": 0.5, "pattern": "2:4"},
               {"op_names": ["self_attn"], "target_sparsity": 0.5, "pattern": "2:4", "pruning_type": "activation",
                "pruning_scope": "local"}]})


# ---------------------------------------------------------------------- compressed-tensors
@pytest.mark.parametrize("pattern,structure", [("2:4", "2:4"), ("1x1", "unstructured")])
def test_compressed_tensors_round_trip(checkpoints, tmp_path, pattern, structure):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.config import SparsityCompressionConfig

    config = {"target_sparsity": 0.5, "pattern": pattern, "pruning_scope": "local"}
    src = checkpoints["llama"]
    report = fxprune.prune_checkpoint(src, config, tmp_path / "plain")
    assert main(["prune", str(src), "--config", _yaml(tmp_path, config),
                 "--out", str(tmp_path / "ct"), "--format", "compressed-tensors", "--quiet"]) == 0
    saved = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "compressed-tensors" and saved["version"] == ct.__version__
    sparsity = SparsityCompressionConfig.load_from_registry(saved["sparsity_config"]["format"],
                                                           **saved["sparsity_config"])
    assert sparsity.sparsity_structure == structure and sparsity.ignore == ["lm_head"]
    assert sparsity.global_sparsity == pytest.approx(report.sparsity, abs=1e-6)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert type(model.hf_quantizer).__name__ == "CompressedTensorsHfQuantizer"
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain").state_dict()
    got = model.state_dict()
    assert set(got) == set(plain)
    for key, value in plain.items():
        assert torch.equal(got[key].view(torch.uint8), value.view(torch.uint8)), key


def _yaml(tmp_path, config):
    import yaml
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_compressed_tensors_missing_package_is_one_line(checkpoints, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "compressed_tensors", None)
    _fails(checkpoints["llama"], tmp_path, r"needs the compressed-tensors package .*pip install 'fxprune\[compressed-tensors\]'",
           format="compressed-tensors")
