"""fxprune.export: ONNX export, embedded report, validation checks and their failures."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import fxprune
from fxprune.export import (ExportError, ValidationError, read_metadata, read_report, to_onnx,
                            validate_onnx)
from fxprune.export.sparsity import find_weight
from fxprune.report import LayerReport, SparsityReport

transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------------------------- models
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    """Conv-BN-ReLU, then a residual block whose BN the exporter folds into the conv."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(y + self.bn2(self.conv2(y)))
        return self.fc(y.mean((2, 3)))


class TwoHeads(nn.Module):
    """Nested outputs: a tuple holding a tensor and a dict."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        return y, {"sum": y.sum(-1), "max": y.amax(-1)}


def make_mlp():
    torch.manual_seed(0)
    return MLP().eval(), (torch.randn(4, 16),)


def make_cnn():
    torch.manual_seed(0)
    model = CNN().eval()
    for bn in (model.bn1, model.bn2):  # non-trivial statistics, so BN folding scales filters
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-0.5, 0.5)
    return model, (torch.randn(2, 3, 8, 8),)


def make_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100)
    return transformers.BertModel(config).eval(), (torch.randint(0, 100, (2, 8)),)


def hand_pruned_mlp():
    """An MLP with every other row of fc1 and half the columns of fc2 zeroed by hand, and the
    report fxprune would write for it."""
    model, x = make_mlp()
    with torch.no_grad():
        model.fc1.weight[::2] = 0
        model.fc2.weight[:, :16] = 0
    layers = [_layer("fc1", model.fc1.weight), _layer("fc2", model.fc2.weight)]
    return model, x, SparsityReport(layers, config={"pattern": "hand"})


def _layer(name, weight, zeros=None):
    zeros = int((weight == 0).sum()) if zeros is None else zeros
    shape = list(weight.shape)
    return LayerReport(name=name, param=f"{name}.weight", module_type="Linear",
                       weight_shape=shape, view_shape=shape, pattern="hand", block_shape=None,
                       scope="local", criterion="magnitude", requested_sparsity=0.5,
                       achieved_sparsity=zeros / weight.numel(), numel=weight.numel(),
                       zeros=zeros, status="pruned")


def _check(result, name):
    return next(c for c in result.checks if c.name == name)


# ---------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("make", [make_mlp, make_cnn, make_bert], ids=["mlp", "cnn", "bert"])
@pytest.mark.parametrize("pattern", ["4x1", "2:4", "1xchannel"])
def test_transform_export_validate(tmp_path, make, pattern):
    model, x = make()
    pruned = fxprune.transform(model, {"target_sparsity": 0.5, "pattern": pattern}, x)
    report = fxprune.sparsity_report(pruned)
    result = to_onnx(pruned, x, tmp_path / "m.onnx", latency_runs=2)

    assert result.passed and result.data_path is None
    assert result.size == (tmp_path / "m.onnx").stat().st_size
    assert result.latency_runs == 2 and result.latency_ms > 0
    names = [c.name for c in result.checks]
    assert names[:4] == ["onnx.checker", "onnxruntime session", "outputs: example inputs",
                         "outputs: random inputs"]
    # one survival check per pruned layer, and the ONNX tensor holds exactly its zeros
    pruned_layers = [layer for layer in report.layers if layer.status == "pruned"]
    assert names[4:] == [f"sparsity: {layer.param}" for layer in pruned_layers]
    for layer in pruned_layers:
        figures = _check(result, f"sparsity: {layer.param}").figures
        assert figures["onnx_zeros"] == figures["report_zeros"] == layer.zeros
    # the embedded report is the model's report
    assert read_report(result.path).to_dict() == report.to_dict()


def test_bert_transposed_weights_are_found_by_value(tmp_path):
    model, x = make_bert()
    pruned = fxprune.transform(model, {"target_sparsity": 0.5, "pattern": "4x1"}, x)
    result = to_onnx(pruned, x, tmp_path / "bert.onnx", latency_runs=0)
    query = _check(result, "sparsity: encoder.layer.0.attention.self.query.weight").figures
    # Linear on 3-D input becomes MatMul against W.T, stored under a new name
    assert query["matched_by"] == "values, transposed"
    onnx_model = onnx.load(str(result.path))
    tensor = next(t for t in onnx_model.graph.initializer if t.name == query["tensor"])
    weight = pruned.encoder.layer[0].attention.self.query.weight.detach().numpy()
    np.testing.assert_array_equal(numpy_helper.to_array(tensor), weight.T)


def test_bert_keyword_inputs_and_dynamic_shapes(tmp_path):
    model, (ids,) = make_bert()
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
    inputs = {"input_ids": ids, "attention_mask": mask}
    result = to_onnx(model, inputs, tmp_path / "bert.onnx", latency_runs=0,
                     dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                     "attention_mask": {0: batch, 1: seq}})
    assert _check(result, "outputs: example inputs").figures["outputs"] == 2
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()] == [["batch", "seq"], ["batch", "seq"]]
    ids2 = torch.randint(0, 100, (3, 5))
    got = session.run(None, {"input_ids": ids2.numpy(),
                             "attention_mask": np.ones((3, 5), dtype=np.int64)})
    with torch.no_grad():
        expected = model(ids2)
    np.testing.assert_allclose(got[0], expected.last_hidden_state.numpy(), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(got[1], expected.pooler_output.numpy(), rtol=1e-3, atol=1e-5)


def test_mlp_dynamic_batch(tmp_path):
    model, x, report = hand_pruned_mlp()
    result = to_onnx(model, x, tmp_path / "mlp.onnx", report=report, latency_runs=0,
                     dynamic_shapes=({0: "batch"},))
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 16]
    x5 = torch.randn(5, 16)
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"x": x5.numpy()})[0], model(x5).numpy(),
                                   rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------------------------- result, metadata
def test_hand_pruned_mlp_result_and_metadata(tmp_path):
    model, x, report = hand_pruned_mlp()
    result = to_onnx(model, x, tmp_path / "mlp.onnx", report=report, latency_runs=3)
    assert result.passed and result.report is report and result.opset >= 18
    assert {c.name: c.figures["onnx_zeros"] for c in result.checks
            if c.name.startswith("sparsity")} == {"sparsity: fc1.weight": 256,
                                                   "sparsity: fc2.weight": 512}
    assert _check(result, "sparsity: fc1.weight").figures["matched_by"] == "name"
    meta = read_metadata(result.path)
    assert meta["fxprune.version"] == fxprune.__version__
    assert json.loads(meta["fxprune.report"]) == report.to_dict()
    ort_meta = ort.InferenceSession(str(result.path)).get_modelmeta().custom_metadata_map
    assert ort_meta["fxprune.report"] == meta["fxprune.report"]
    text = str(result)
    assert str(result.path) in text and "validation passed" in text
    assert "sparsity: fc2.weight" in text and "median of 3 runs" in text


def test_nested_outputs_are_all_compared(tmp_path):
    torch.manual_seed(0)
    result = to_onnx(TwoHeads().eval(), (torch.randn(3, 8),), tmp_path / "two.onnx",
                     latency_runs=0)
    figures = _check(result, "outputs: random inputs").figures
    assert figures["outputs"] == 3


def test_default_report_absent_for_plain_model(tmp_path):
    model, x = make_mlp()
    result = to_onnx(model, x, tmp_path / "plain.onnx", latency_runs=0)
    assert result.report is None
    assert not any(c.name.startswith("sparsity") for c in result.checks)
    assert read_metadata(result.path) == {"fxprune.version": fxprune.__version__}
    with pytest.raises(ExportError, match="has no 'fxprune.report' metadata"):
        read_report(result.path)


def test_validate_false_writes_without_checks(tmp_path):
    model, x, report = hand_pruned_mlp()
    result = to_onnx(model, x, tmp_path / "mlp.onnx", report=report, validate=False)
    assert result.checks == [] and result.latency_ms is None
    assert "validation: skipped" in str(result)
    assert read_report(result.path).to_dict() == report.to_dict()


def test_external_data(tmp_path):
    model, x, report = hand_pruned_mlp()
    path = tmp_path / "mlp.onnx"
    result = to_onnx(model, x, path, report=report, external_data=True, latency_runs=0)
    assert result.passed
    assert result.data_path == tmp_path / "mlp.onnx.data" and result.data_path.is_file()
    assert result.size == path.stat().st_size + result.data_path.stat().st_size
    assert "mlp.onnx.data" in str(result)
    assert read_report(path).to_dict() == report.to_dict()


def test_training_mode_is_restored(tmp_path):
    model, x = make_cnn()
    model.train()
    result = to_onnx(model, x, tmp_path / "cnn.onnx", latency_runs=0)
    assert result.passed  # exported and compared in eval mode (BN running statistics)
    assert model.training and model.bn1.training


# ---------------------------------------------------------------------------------- failures
def test_lost_zeros_raise_validation_error_with_table(tmp_path):
    model, x, report = hand_pruned_mlp()
    report.layers[0].zeros = 300  # more zeros than fc1 has (256)
    with pytest.raises(ValidationError) as info:
        to_onnx(model, x, tmp_path / "mlp.onnx", report=report, latency_runs=0)
    err = info.value
    assert [c.name for c in err.checks if not c.passed] == ["sparsity: fc1.weight"]
    assert "failed 1 of 6 validation checks" in str(err)
    assert "sparsity: fc1.weight" in str(err) and "FAIL" in str(err)
    assert "has 256 zeros, the report recorded 300" in str(err)
    assert err.result.path.is_file()  # kept for inspection


def test_dense_copy_in_onnx_fails_survival(tmp_path):
    """A graph whose fc2 weight lost its zeros is still matched, and fails the zero count."""
    model, x, report = hand_pruned_mlp()
    path = tmp_path / "mlp.onnx"
    to_onnx(model, x, path, report=report, validate=False)
    onnx_model = onnx.load(str(path))
    tensor = next(t for t in onnx_model.graph.initializer if t.name == "fc2.weight")
    dense = numpy_helper.to_array(tensor).copy()
    dense[dense == 0] = 0.5
    tensor.CopyFrom(numpy_helper.from_array(dense, "fc2.weight"))
    onnx.save(onnx_model, str(path))

    checks = {c.name: c for c in validate_onnx(path, model, x)}  # the embedded report
    assert not checks["sparsity: fc2.weight"].passed
    assert checks["sparsity: fc2.weight"].figures["onnx_zeros"] == 0
    assert checks["sparsity: fc1.weight"].passed
    assert not checks["outputs: example inputs"].passed  # the graph computes something else


def test_other_model_fails_output_checks(tmp_path):
    model, x = make_mlp()
    to_onnx(model, x, tmp_path / "mlp.onnx", validate=False)
    torch.manual_seed(1)
    other = MLP().eval()
    checks = {c.name: c for c in validate_onnx(tmp_path / "mlp.onnx", other, x)}
    assert checks["onnx.checker"].passed and checks["onnxruntime session"].passed
    for name in ("outputs: example inputs", "outputs: random inputs"):
        assert not checks[name].passed
        assert checks[name].figures["tolerance_used"] > 1
        assert "raise rtol/atol" in checks[name].message


def test_missing_parameter_fails_survival(tmp_path):
    model, x, report = hand_pruned_mlp()
    report.layers[0].param = "fc9.weight"
    checks = {c.name: c for c in validate_onnx(
        to_onnx(model, x, tmp_path / "m.onnx", validate=False).path, model, x, report=report)}
    assert not checks["sparsity: fc9.weight"].passed
    assert "no parameter 'fc9.weight'" in checks["sparsity: fc9.weight"].message


# ---------------------------------------------------------------------------------- find_weight
def _tensors(**arrays):
    return {name: numpy_helper.from_array(a.astype(np.float32), name)
            for name, a in arrays.items()}


def test_find_weight_transposed_scaled_and_dense_copies():
    rng = np.random.default_rng(0)
    conv = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    conv[1] = 0  # a pruned filter
    conv[:, :, 0, 0] = 0
    scale = np.array([2.0, 0.5, 3.0, 0.25], dtype=np.float32)  # BN folded per output channel
    lin = rng.standard_normal((6, 4)).astype(np.float32)
    lin[:, ::2] = 0
    dense_lin = lin.copy()
    dense_lin[lin == 0] = 1.0
    tensors = _tensors(val_1=conv * scale[:, None, None, None], val_2=lin.T,
                       val_3=rng.standard_normal((4, 6)), val_4=dense_lin)

    (name, how, arr), = find_weight(tensors, "conv.weight", conv)
    assert (name, how) == ("val_1", "values") and (arr == 0).sum() == (conv == 0).sum()
    assert [(n, h) for n, h, _ in find_weight(tensors, "fc.weight", lin)] == [
        ("val_2", "values, transposed"), ("val_4", "values")]
    assert find_weight(tensors, "fc.weight", rng.standard_normal((6, 4))) == []
    # the exact name wins over value matching
    assert [h for _, h, _ in find_weight(_tensors(**{"fc.weight": lin}), "fc.weight", lin)] == [
        "name"]


# ---------------------------------------------------------------------------------- usage errors
def test_missing_directory(tmp_path):
    model, x = make_mlp()
    with pytest.raises(ExportError, match=r"directory .*nope does not exist; create it first"):
        to_onnx(model, x, tmp_path / "nope" / "m.onnx")


def test_path_is_a_directory(tmp_path):
    model, x = make_mlp()
    with pytest.raises(ExportError, match=r"is a directory; pass a file path such as"):
        to_onnx(model, x, tmp_path)


def test_unwritable_directory(tmp_path, monkeypatch):
    import fxprune.export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export.os, "access", lambda p, mode: False)
    model, x = make_mlp()
    with pytest.raises(ExportError, match=r"is not writable; choose a writable location"):
        to_onnx(model, x, tmp_path / "m.onnx")


def test_wrong_example_inputs(tmp_path):
    model, _ = make_mlp()
    with pytest.raises(ExportError, match=r"fails on example_inputs .*MLP\.forward\(x\)"):
        to_onnx(model, (torch.randn(4, 15),), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match=r"example_inputs is a str"):
        to_onnx(model, "x.pt", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_bad_onnx_files(tmp_path):
    model, x = make_mlp()
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\xfe not a protobuf \x00\x01")
    for read in (read_report, lambda p: validate_onnx(p, model, x)):
        with pytest.raises(ExportError, match="missing.onnx: no such file"):
            read(tmp_path / "missing.onnx")
        with pytest.raises(ExportError, match="junk.onnx is not an ONNX model"):
            read(junk)
