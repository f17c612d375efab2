"""The fxprune command line: subprocess on a .pt2 archive, exit codes, one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import MLP
from fxprune.cli import main, parse_inputs

CONFIG = "target_sparsity: 0.5\npattern: 4x1\n"


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "prune.yaml").write_text(CONFIG)
    model = MLP().eval()
    torch.export.save(torch.export.export(model, (torch.randn(4, 32),)), tmp_path / "mlp.pt2")
    return tmp_path


def _run(*args, cwd):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "fxprune", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_prune_pt2_to_onnx_then_validate_the_export(workdir):
    proc = _run("prune", "mlp.pt2", "--config", "prune.yaml", "--onnx", "out.onnx",
                "--report", "out.json", "--save", "pruned.pt2", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    layers = {r["name"]: r for r in out["report"]["layers"]}
    # the archive's module keeps the original names; layers.2 is the classifier
    assert layers["layers.0"]["zeros"] + layers["layers.1"]["zeros"] == (32 * 64 + 64 * 64) // 2
    assert layers["layers.2"]["status"].startswith("excluded")
    assert out["onnx"]["passed"] and {c["name"] for c in out["onnx"]["checks"]} >= {
        "onnx.checker", "outputs: example inputs", "sparsity: layers.0.weight"}
    assert json.loads((workdir / "out.json").read_text())["totals"] == out["report"]["totals"]
    proc = _run("validate", "out.onnx", "--model", "pruned.pt2", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "passed" in proc.stdout and "sparsity: layers.1.weight" in proc.stdout


def test_validate_against_another_model_exits_1(workdir):
    assert _run("prune", "mlp.pt2", "--config", "prune.yaml", "--onnx", "out.onnx", "-q",
                cwd=workdir).returncode == 0
    proc = _run("validate", "out.onnx", "--model", "mlp.pt2", cwd=workdir)  # the dense archive
    assert proc.returncode == 1
    assert "FAILED" in proc.stdout and "outputs: example inputs" in proc.stdout


def _one_line_error(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert match in err, err


def test_bad_inputs_are_one_line_errors_with_exit_2(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    (workdir / "corrupt.pt2").write_bytes(b"not a zip archive")
    (workdir / "typo.yaml").write_text("target_sparsty: 0.5\n")
    _one_line_error(capsys, ["prune", "corrupt.pt2", "--config", "prune.yaml"],
                    "MODEL file 'corrupt.pt2' is not a torch.export archive")
    _one_line_error(capsys, ["prune", "mlp.pt2", "--config", "typo.yaml"],
                    "unknown key 'target_sparsty'; did you mean 'target_sparsity'?")
    _one_line_error(capsys, ["prune", "mlp.pt2", "--config", "prune.yaml", "--example-inputs", "float32[4,"],
                    "--example-inputs 'float32[4,' is not DTYPE[D0,D1,...]")
    _one_line_error(capsys, ["prune", "mlp.pt2", "--config", "prune.yaml", "--example-inputs", "float32[4,31]"],
                    "GraphModule cannot run on example_inputs (AssertionError: Guard failed: x.size()[1] == 32)")
    _one_line_error(capsys, ["prune", "nosuch", "--config", "prune.yaml"],
                    "is not a .pt2 file, a pkg.module:factory or a built-in example")
    _one_line_error(capsys, ["prune", "mlp.pt2", "--config", "prune.yaml", "--onnx", "x/y.onnx"],
                    "directory 'x' does not exist")
    _one_line_error(capsys, ["validate", "missing.onnx", "--model", "mlp.pt2"], "does not exist")


def test_inspect_lists_targets_and_why_patterns_do_not_fit(capsys):
    code = main(["inspect", "conftest:SmallCNN", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    targets = {t["name"]: t for t in out["targets"]}
    assert list(targets) == ["conv1", "conv2", "conv3", "fc"]
    assert targets["conv2"]["view"] == [16, 36] and "2:4" in targets["conv2"]["fits"]
    assert targets["conv1"]["does_not_fit"]["2:4"] == "27 columns are not divisible by M=4"
    assert targets["fc"]["does_not_fit"]["4x1"] == "view 10x32 is not divisible by the 4x1 block"


def test_parse_inputs_spec():
    x, ids = parse_inputs("float32[2,3]; int64[1,8]{5,7}")
    assert x.shape == (2, 3) and x.dtype == torch.float32
    assert ids.dtype == torch.int64 and ids.min() >= 5 and ids.max() < 7


def test_inspect_lists_the_registries_with_user_registrations(capsys, tmp_path, monkeypatch):
    (tmp_path / "qa_user_ext.py").write_text(
        "import fxprune\n"
        "from conftest import MLP\n"
        "@fxprune.register_pattern('qa_rows2')\n"
        "class Rows2(fxprune.BasePattern):\n"
        "    def block_layout(self, geom):\n"
        "        rows, cols = geom.view_shape\n"
        "        return 'odd rows' if rows % 2 else fxprune.BlockLayout((rows // 2, 2, 1, cols), (1, 3), 2 * cols, '2xC')\n"
        "@fxprune.register_criterion('qa_abs')\n"
        "class Abs(fxprune.Criterion):\n"
        "    def view_scores(self, name, view):\n"
        "        return view.detach().float().abs()\n"
        "def make():\n"
        "    return MLP()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert main(["inspect", "qa_user_ext:make", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["registries"]["patterns"]["qa_rows2"] == "qa_user_ext.Rows2"
        assert out["registries"]["criteria"]["qa_abs"] == "qa_user_ext.Abs"
        assert {"NxM", "N:M"} <= set(out["registries"]["patterns"])
        assert "qa_rows2" in out["targets"][0]["fits"]
        assert main(["inspect"]) == 0          # no MODEL: the registries only, as text
        text = capsys.readouterr().out
        assert "registered patterns (pattern:):" in text and "qa_rows2  qa_user_ext.Rows2" in text
        assert "sparse_gpt" in text and "qa_abs" in text
    finally:
        import fxprune
        fxprune.PATTERNS.pop("qa_rows2", None)
        fxprune.CRITERIA.pop("qa_abs", None)
