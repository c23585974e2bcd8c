"""The Fashion-MNIST study (examples/fashion_mnist_study.py) in its --quick mode."""

import importlib.util
import json
import math
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def _load_study():
    spec = importlib.util.spec_from_file_location(
        "fashion_mnist_study", ROOT / "examples" / "fashion_mnist_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts examples/ on sys.path for `study`
    return module


@pytest.mark.tensorflow_only
def test_study_quick_writes_table_figures_and_results(tmp_path):
    study = _load_study()
    out, results = tmp_path / "out", tmp_path / "RESULTS.md"
    methods = {"baseline", "trained_default_channel", "scratch_default_channel", "l1norm"}
    argv = ["--quick", "--out", str(out), "--results", str(results),
            "--methods", ",".join(sorted(methods)), "--targets", "0.5",
            "--train-limit", "256", "--test-limit", "200", "--rounds", "2"]
    study.main(argv)

    summary = json.loads((out / "results.json").read_text())
    rows = summary["rows"]
    assert not [r for r in rows if "error" in r]
    assert {r["method"] for r in rows} == methods
    full = summary["reference"]["flops"]
    assert full == 2_552_000  # the main job's ResNet-8
    for row in rows:
        assert math.isfinite(row["accuracy"]) and 0.0 <= row["accuracy"] <= 100.0
        assert 0 < row["flops"] <= full and row["params"] > 0
    (l1,) = [r for r in rows if r["method"] == "l1norm"]
    assert abs(l1["flops"] / full - 0.5) < 0.03  # set by construction
    assert math.isfinite(l1["accuracy_before_finetune"])
    for method in ("trained_default_channel", "scratch_default_channel"):
        (psp,) = [r for r in rows if r["method"] == method]
        assert 0.45 <= psp["flops_fraction"] <= 0.5  # FlopsBudget lands at or just below
        assert psp["regularizer"] == "relative_l1" and psp["relative_alpha"]
        assert psp["cut_fraction"] > 0

    table = {(t["method"], t["target"]): t for t in summary["table"]}
    assert table[("baseline", None)]["latency_ratio"] == pytest.approx(1.0)
    assert all(t["latency_ratio"] > 0 for t in table.values())
    assert set(summary["latency_ms"]) == {"baseline", "l1norm@0.5", "trained_default_channel@0.5",
                                          "scratch_default_channel@0.5"}
    assert all(0.0 <= a <= 100.0 for a in summary["litert_accuracy_first_500"].values())
    assert sorted(p.name for p in (out / "tflite").glob("*.tflite")) == [
        "baseline.tflite", "l1norm_0.5.tflite", "scratch_default_channel_0.5.tflite",
        "trained_default_channel_0.5.tflite"]
    for name in ("accuracy_vs_flops.png", "accuracy_vs_latency.png", "alpha_histograms.png"):
        assert (out / name).read_bytes()[:8] == PNG

    text = results.read_text()
    assert "| method | target | FLOPs (×) | non-zero MACs (×) |" in text
    assert "python examples/fashion_mnist_study.py --quick --out" in text
    assert "Quick smoke run" in text and "not yet measured" in text
    assert "cores" in text and "Elapsed" in text and "Equal budgets" in text
    assert "from the trained model**" in text and "Latency front vs" in text


def test_study_flags():
    study = _load_study()
    full = study.parse_args([])
    assert (full.train_limit, full.epochs, full.finetune_epochs, full.seeds, full.results) == (
        30000, 6, 3, 3, "RESULTS.md")
    assert full.methods == list(study.DEFAULT_METHODS) and full.targets == [0.5, 0.3]
    assert set(study.DEFAULT_METHODS) <= set(study.METHODS)
    labels = sys.modules["study.report"].LABELS  # every row the study can run has a label
    assert set(sys.modules["study.psp_runs"].VARIANTS) <= set(labels)
    assert {"trained_default_group", "scratch_default_group"} <= set(study.SEEDED)
    assert study.seeds_for("l1norm", 0.5, full) == 3 and study.seeds_for("l1norm", 0.3, full) == 1
    assert study.seeds_for("trained_l2_channel", 0.5, full) == 1
    quick = study.parse_args(["--quick", "--out", "x", "--epochs", "2"])
    assert (quick.train_limit, quick.epochs, quick.seeds) == (384, 2, 1)
    assert quick.results == str(pathlib.Path("x") / "RESULTS.md")
    with pytest.raises(SystemExit):
        study.parse_args(["--methods", "baseline,magic"])


def test_baseline_cut_rules():
    _load_study()
    baselines = sys.modules["study.baselines"]
    scores = {"a": np.array([3.0, 1.0, 2.0, 0.5]), "b": np.array([0.1, 0.2])}
    cuts = baselines._global_cuts(scores, 3)  # 0.1, then 0.2 would empty "b": 0.5 and 1.0
    assert cuts["a"].tolist() == [False, True, False, True] and cuts["b"].tolist() == [True, False]
    uniform = baselines._uniform_cuts(scores, 2, 4)  # half of each block
    assert uniform["a"].tolist() == [False, True, False, True]
    assert uniform["b"].tolist() == [True, False]
    assert baselines._uniform_cuts(scores, 4, 4)["b"].sum() == 1  # one channel always stays
