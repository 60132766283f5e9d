"""The benchmark's smoke run (`benchmarks/bench_study.py --smoke`): it finishes and every figure is there and sane."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT

CONFIGS = [f"{activation}-{loss}" for loss in ("crossentropy", "hinge") for activation in ("tanh", "sigmoid", "relu")]
CHANCE = 0.1


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory, mnist_path: Path) -> tuple[dict, str]:
    output = tmp_path_factory.mktemp("bench") / "results.json"
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_study.py", "--smoke", "--data", str(mnist_path), "--output", str(output)],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,  # ~1.5 min on a quiet 2-core machine; far longer when it is shared
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(output.read_text()), result.stdout


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
@pytest.mark.bench_smoke
def test_smoke_times_and_accuracies(smoke: tuple[dict, str]) -> None:
    results, stdout = smoke
    assert results["smoke"] is True and results["epochs"] == 1 and results["batch_size"] == 32
    assert results["split"] == {"train": 2700, "val": 300, "test": 1000}
    wall = results["wall_seconds"]
    for name in ("baseline", "study", "study_without_tracking"):
        assert positive(wall[name]), name
    assert wall["study_rerun"] is None  # the rerun with a warm compile cache is left out of the smoke mode
    assert results["ratio_study_to_baseline"] == pytest.approx(wall["study"] / wall["baseline"], rel=1e-3)
    assert all(positive(seconds) for seconds in results["cpu_seconds"].values())
    assert set(results["test_accuracy"]) == set(CONFIGS)
    for name, row in results["test_accuracy"].items():
        for side in ("baseline", "study", "study_without_tracking"):
            assert CHANCE < row[side] <= 1.0, (name, side, row)
    # The same seeded training with and without MLflow: the same models, up to float noise.
    for row in results["test_accuracy"].values():
        assert abs(row["study"] - row["study_without_tracking"]) < 0.05
    checks = results["checks"]
    assert checks["study_finished_runs"] == 7  # the parent and six configuration runs
    assert checks["baseline_logging"] == "mlflow.keras.autolog()"
    assert checks["baseline_models_logged"] == checks["baseline_models_requested"] == 1
    assert checks["baseline_epochs_logged"] == {name: 1 for name in CONFIGS}
    overhead = results["tracking_overhead"]
    assert overhead["overhead"] == pytest.approx(
        (overhead["with_tracking_seconds"] - overhead["without_tracking_seconds"]) / overhead["with_tracking_seconds"],
        abs=1e-3,
    )
    assert overhead["pairs"] == [
        {"with_tracking_seconds": wall["study"], "without_tracking_seconds": wall["study_without_tracking"]}
    ]  # one pair in smoke mode: its medians are its own times
    assert "ratio study/baseline" in stdout and "Written:" in stdout


@pytest.mark.slow
@pytest.mark.bench_smoke
def test_smoke_throughput_peak_and_memory(smoke: tuple[dict, str]) -> None:
    results, _ = smoke
    throughput = results["throughput"]
    assert throughput["flops_per_image"] == 6 * (784 * 128 + 128 * 64 + 64 * 10)
    assert throughput["backend"] == "jax"
    peak = results["matmul_peak"]
    assert positive(peak["gflops_one_core"]) and positive(peak["gflops_all_cores"])
    # the larger of the peak in this environment and with OpenBLAS's own kernel choice (no OPENBLAS_CORETYPE)
    both = (peak["gflops_one_core_this_environment"], peak["gflops_one_core_openblas_default"])
    assert peak["gflops_one_core"] == max(both)
    default_environment = peak["numpy_config_openblas_default_process"]["environment"]
    assert default_environment["OPENBLAS_CORETYPE"] is None and default_environment["OPENBLAS_L2_SIZE"] is None
    assert peak["numpy_config_one_core_process"]["threadpools"], "threadpoolctl found no BLAS"
    assert "OPENBLAS_CORETYPE" in peak["numpy_config_benchmark_process"]["environment"]
    assert set(throughput["batch"]) == {"32", "128"}
    for row in throughput["batch"].values():
        assert positive(row["images_per_second"])
        assert row["gflops"] == pytest.approx(row["images_per_second"] * throughput["flops_per_image"] / 1e9, rel=0.01)
        assert row["fraction_of_peak"] == pytest.approx(row["gflops"] / peak["gflops_one_core"], rel=0.01)
        assert 0 < row["fraction_of_peak"] < 1
    memory = results["peak_rss_mb"]
    assert set(memory) == {"baseline", "study", "untracked", "throughput"}
    for name, row in memory.items():
        assert 50 < row["largest_process_rss_mb"], name
        assert row["peak_tree_rss_mb"] >= 0.8 * row["largest_process_rss_mb"], name  # sampled vs exact
        assert 0 < row["peak_tree_pss_mb"] <= row["peak_tree_rss_mb"] + 1, name
    assert memory["study"]["peak_processes"] >= 3  # `main` and its worker processes were all counted
    targets = results["targets"]
    assert set(targets) == {
        "ratio_study_to_baseline",
        "tracking_overhead",
        "fraction_of_peak_batch_128",
        "study_peak_rss_mb",
    }
    assert all(isinstance(row["met"], bool) for row in targets.values())
