"""The benchmark scripts run (their --tiny smoke modes) and print their tables. Nothing here is timed: the figures
are machine-dependent and belong in the README, not in assertions."""

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def run_benchmark(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / script), *args], capture_output=True,
                            text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def table_rows(output: str, first_cell: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in output.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_segmentation_benchmark_splits_model_and_rest_time():
    output = run_benchmark("segmentation.py", "--tiny", "--repeats", "1", "--images", "1")
    rows = {row[0]: row for row in table_rows(output, "voc21") + table_rows(output, "ade150")}
    assert set(rows) == {"voc21 (21 classes)", "ade150 (150 classes)"}
    for row in rows.values():
        images_per_s, model_s, rest_s, share = map(float, row[2:6])
        assert images_per_s > 0 and model_s > 0 and rest_s >= 0 and share >= 0


def test_data_loader_benchmark_reports_stages_and_workers():
    output = run_benchmark("data_loader.py", "--tiny", "--workers", "0")
    assert re.search(r"images/s per worker: \d+\.\d", output)
    stages = {row[0] for row in table_rows(output, "") if len(row) == 2}
    assert {"decode", "teacher crops", "student view", "VFM view"} <= stages
    assert table_rows(output, "0")[0][1].replace(".", "").isdigit()  # the loader's images/s with 0 workers


def test_gpu_check_script_parses_and_names_its_options():
    script = REPO_ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    result = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 2 and "--dry-run" in result.stderr


def test_train_step_benchmark_prints_matmul_rates_and_ratios():
    output = run_benchmark("train_step.py", "--tiny", "--steps", "1", "--rounds", "2", "--matmul_seconds", "0.2",
                           "--variants", "fp32", "bf16 autocast + bf16 teachers", "--profile")
    assert re.search(r"matmul rates before: fp32 matmul \d+ GFLOP/s, bf16 \d+ GFLOP/s, R = \d+\.\d\d", output)
    assert re.search(r"matmul rates after round 2: fp32 matmul \d+ GFLOP/s", output)
    assert "2 round(s) of 1 step(s)" in output
    main, profile = output.split("Where the time goes")
    ratios = [row[2] for row in table_rows(main, "fp32") + table_rows(main, "bf16 autocast")]
    assert ratios[0] == "1.00 (1.00-1.00)" and float(ratios[1].split()[0]) > 0
    shares = [float(cell.rstrip("%")) for cell in table_rows(profile, "fp32")[0][1:4]]
    assert shares[0] > 0 and abs(sum(shares) - 100) <= 2  # rounded percentages of one step


def test_train_step_ratios_are_taken_within_each_round():
    """A slow round slows every row: the ratio is the median of the per-round ratios, not a ratio of medians."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from train_step import summarise

    def result(images_per_s, peak):
        return {"images_per_s": images_per_s, "peak_rss_gib": peak, "step_s": 2 / images_per_s, "teacher_s": 1.0,
                "vfm_s": 0.5, "student_s": 0.5}

    reference = [result(1.0, 4.0), result(0.5, 4.0), result(0.9, 4.0)]  # round 2 on a busy machine
    ours = [result(1.2, 3.0), result(0.6, 3.0), result(1.17, 3.2)]
    row = summarise("ours", ours, reference)
    assert row["ratio"] == pytest.approx(1.2) and (row["ratio_min"], row["ratio_max"]) == pytest.approx((1.2, 1.3))
    assert row["images_per_s"] == 1.17 and (row["min"], row["max"]) == (0.6, 1.2)
    assert row["memory_ratio"] == 0.75 and row["peak_gib"] == 3.2


def test_train_step_refuses_an_authors_folder_without_their_code(tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "train_step.py"), "--tiny", "--authors_src",
                             str(tmp_path)], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 2 and "not the src folder of a DeCLIP checkout" in result.stderr


def test_fused_qkv_benchmark_compares_both_ways_at_both_shapes():
    output = run_benchmark("fused_qkv.py", "--width", "32", "--rounds", "1", "--repeats", "1")
    rows = table_rows(output, "teacher crops") + table_rows(output, "DINOv2-B view")
    assert [row[1] for row in rows] == ["float32", "bfloat16"] * 2
    assert all(float(row[2]) > 0 and float(row[3]) > 0 and float(row[4]) > 0 for row in rows)
