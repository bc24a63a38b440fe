"""The benchmarks run end to end and write their README tables (their figures are not checked:
speed is measured by running them, not by tests)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _readme(tmp_path: Path, *blocks: str) -> Path:
    path = tmp_path / "README.md"
    path.write_text("".join(f"before\n<!-- {b}:begin -->\nold\n<!-- {b}:end -->\nafter\n" for b in blocks))
    return path


def _run(*args: str) -> list[dict]:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_the_encoder_benchmark_measures_every_technique_against_the_baseline(tmp_path):
    readme = _readme(tmp_path, "encoder")
    rows = _run(
        "benchmarks/encoder.py",
        *("--presets", "hunyuan-vae-tiny", "--sizes", "64x64", "--frames", "5", "--repeat", "1"),
        *("--readme", str(readme)),
    )
    techniques = [r["technique"] for r in rows]
    assert techniques == ["baseline", "channels-last", "math-attention", "exact-chunks", "opensora-tiles", "diffusers"]
    for r in rows:
        assert r["frames_per_s"] > 0 and r["tflops"] > 0 and r["peak_memory_gb"] > 0
        assert r["max_abs_diff"] < 1e-3 or r["technique"] == "exact-chunks"  # chunk norms differ
    text = readme.read_text()
    assert "old" not in text and text.startswith("before\n") and text.endswith("after\n")
    assert "| hunyuan-vae-tiny | 1x3x5x64x64 | diffusers |" in text and "benchmarks/encoder.py --presets" in text


def test_the_throughput_benchmark_runs_the_job_and_the_loop_on_one_dataset(tmp_path):
    readme = _readme(tmp_path, "throughput")
    rows = _run(
        "benchmarks/throughput.py",
        *("--clips", "8", "--per-shard", "4", "--resize", "decoder", "--techniques", "float-frames", "ray-nice-15"),
        *("--size", "64x48", "--source-scale", "2", "--frames", "40"),  # clips longer than demo_data's shortest
        *("--readme", str(readme)),
    )
    by_name = {r["name"]: r for r in rows}
    for name in ("decode, 1 thread", "encode, batch 4", "baseline: single-process loop", "job, end to end"):
        assert by_name[name]["frames"] == 8 * 40, name  # every clip, 40 frames each (each video is long enough)
    # The loop runs in a process of its own, as a trainer's script does (its heap grows as the actor's)
    assert by_name["baseline: single-process loop"]["pid"] != by_name["encode, batch 4"]["pid"]
    assert by_name["job, end to end"]["clips"] == by_name["job, float32 host frames"]["clips"] == 8
    assert by_name["job, Ray's workers at its default nice 15"]["clips"] == 8  # on a cluster started again
    job = by_name["job, end to end"]  # where its actor's time went (the first shard may wait for nothing)
    assert job["decode_wait_s"] >= 0 and 0 < job["model_share"] < 1 and job["model_share"] + job["wait_share"] <= 1
    text = readme.read_text()
    assert "of the bound (target 0.9)" in text and "2 per shard" not in text and "4 per shard" in text
    assert "`video.resize: decoder`" in text and "| job, float32 host frames |" in text
    assert "one 40x48x64 clip each" in text and "5 sizes from 192x320 to 384x224, 40 to 68 frames" in text
    assert by_name["job, end to end"]["clip"] == [40, 48, 64]


def test_the_load_benchmark_shows_no_float32_copy_in_host_memory_when_loading_in_bf16():
    rows = _run("benchmarks/load_memory.py", "--presets", "flux-ae", "--ways", "per tensor", "host copy")
    per_tensor, host_copy = rows
    file_mib = per_tensor["checkpoint_mib"]
    assert per_tensor["model_mib"] == pytest.approx(file_mib / 2, rel=0.01)  # the model is bf16
    # The job's loader adds the bf16 model to the process's own memory, and no float32 copy: the file's
    # pages stay the page cache's. A loader that reads the file into RAM first holds it whole.
    assert per_tensor["host_anon_peak_mib"] < 0.7 * file_mib
    assert host_copy["host_anon_peak_mib"] > file_mib


def test_every_readme_table_that_the_gpu_script_writes_is_in_the_readme():
    # On the GPU machine a missing block would stop the script half way (`set -e`), its device time lost.
    script = (REPO / "benchmarks" / "gpu.sh").read_text()
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"--block (\S+)", script)
    assert len(blocks) == script.count("--readme README.md") == 4
    for name in blocks:
        assert f"<!-- {name}:begin -->" in readme and f"<!-- {name}:end -->" in readme, name
    tests = re.findall(r"tests/\S+\.py", script)  # its correctness part, run before the figures
    assert "tests/test_cuda.py" in tests
    for path in tests:
        assert (REPO / path).is_file(), path
