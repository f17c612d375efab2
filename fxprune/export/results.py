"""Result objects of ``fxprune.export``: one ``Check`` per validation check, one ``ExportResult``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Check:
    """One validation check. ``figures`` are the numbers it was decided on; ``message`` says
    what went wrong and what to do about it (empty when the check passed)."""

    name: str
    passed: bool
    figures: dict = field(default_factory=dict)
    message: str = ""


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def format_checks(checks: list[Check]) -> str:
    """A plain-text table: one row per check, the failure message indented under its row."""
    width = max([len("check")] + [len(c.name) for c in checks])
    lines = [f"{'check':<{width}}  result  figures"]
    for c in checks:
        figures = ", ".join(f"{k}={_fmt(v)}" for k, v in c.figures.items())
        lines.append(f"{c.name:<{width}}  {'ok' if c.passed else 'FAIL':<6}  {figures}".rstrip())
        if c.message:
            lines.append(f"    -> {c.message}")
    return "\n".join(lines)


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class ExportResult:
    """What ``to_onnx`` wrote and what validation found.

    ``size`` counts the ``.onnx`` file plus the external-data file (``data_path``) when there is
    one. ``checks`` is empty and ``latency_ms`` is None when ``validate=False``.
    """

    path: Path
    data_path: Path | None
    size: int
    opset: int
    report: object | None = None  # the embedded fxprune.report.SparsityReport, or None
    checks: list[Check] = field(default_factory=list)
    latency_ms: float | None = None  # ORT CPU median over latency_runs runs, warm-up excluded
    latency_runs: int = 0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def __str__(self) -> str:
        files = str(self.path) + (f" + {self.data_path.name}" if self.data_path else "")
        lines = [f"ONNX export: {files} ({_human_size(self.size)}, opset {self.opset})"]
        if self.report is not None:
            pruned = sum(1 for layer in self.report.layers if layer.status == "pruned")
            lines.append(f"sparsity report: embedded ({pruned} pruned layers, "
                         f"sparsity {self.report.sparsity:.3f})")
        else:
            lines.append("sparsity report: none embedded")
        if self.checks:
            verdict = "passed" if self.passed else "FAILED"
            lines += [f"validation {verdict}:", format_checks(self.checks)]
        else:
            lines.append("validation: skipped")
        if self.latency_ms is not None:
            lines.append(f"onnxruntime CPU latency: {self.latency_ms:.3f} ms "
                         f"(median of {self.latency_runs} runs, warm-up excluded)")
        return "\n".join(lines)
