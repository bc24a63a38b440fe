"""The operator's view: progress lines for logs, `DIR/report.json`, and `python -m jobs.status DIR`."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

from conftest import small_config

from jobs import status
from jobs.dataset.catalog import output_lock
from jobs.orchestration.driver import run
from jobs.orchestration.progress import ProgressBar


def test_progress_for_logs_is_plain_lines_with_errors_and_each_actors_rate():
    stream = io.StringIO()  # not a terminal, as under `ray job logs -f`
    bar = ProgressBar(total=10, shards=2, stream=stream, log_every=0.0)
    bar.update(samples=3, frames=24, errors=1, actor="w0")
    bar.update(samples=2, frames=16, actor="w1")
    bar.close()
    out = stream.getvalue()
    assert "\r" not in out and "\x1b" not in out and out.count("\n") == 3
    last = out.splitlines()[-1]
    assert last.startswith("5/10 samples  50.0% |") and "1 errors," in last and "frames/s" in last and "ETA" in last
    assert " | per actor: w0 " in last and "/s, w1 " in last


def test_report_and_status_of_a_run_with_a_failed_shard(ray_cluster, demo_shards, tmp_path, capsys):
    out = tmp_path / "out"
    missing = f"pipe:cat {tmp_path / 'gone.tar'}"
    config = small_config([*map(str, demo_shards[:2]), missing], out, run={"max_attempts": 1})
    summary = run(config, allow_shell=True)
    assert not summary.complete
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is False and report["shards"]["written"] == 2
    assert list(report["shards"]["failed"]) == ["gone"] and "ShardReadError" in report["shards"]["failed"]["gone"]
    assert {s["name"] for s in report["slowest_shards"]} == {p.stem for p in demo_shards[:2]}
    files = [*(out / "latents").glob("*.tar"), *(out / "meta").glob("*.parquet")]
    assert report["bytes_written"] == sum(p.stat().st_size for p in files)
    assert sum(a["samples"] for a in report["actors"].values()) == 8 and report["ok"] == 8
    assert "written: " in summary.text() and "slowest shards: " in summary.text()
    for actor in report["actors"].values():  # where its time went: the model, waiting for decodes, the rest
        assert 0 < actor["model_s"] and actor["model_s"] + actor["decode_wait_s"] < actor["seconds"]
        assert actor["model_busy"] == round(actor["model_s"] / actor["seconds"], 3)
    assert re.search(r"the actors' time: \d+% in the model, \d+% waiting for decoding, \d+% reading", summary.text())

    state = status.status(out)
    assert (state["inputs"], state["committed"], state["ok"], state["running"]) == (3, 2, 8, False)
    assert state["pending"] == [missing] and list(state["failed_last_run"]) == ["gone"]
    assert status.main([str(out)]) == 1
    printed = capsys.readouterr().out
    assert "2 of 3 input shards committed (8 rows: 8 ok, 0 errors" in printed
    assert "failed in the last run: gone: 1 attempts, last: ShardReadError" in printed
    assert "a job is writing it now: no" in printed and "not finished" in printed
    assert re.search(r"\n  the actors' time: \d+% in the model, \d+% waiting for decoding", printed)
    with output_lock(out):  # as while a job runs
        assert status.status(out)["running"] is True


def test_status_of_a_finished_run_and_of_a_directory_that_is_no_dataset(ray_cluster, demo_shards, tmp_path):
    out = tmp_path / "out"
    assert run(small_config(demo_shards[:1], out)).complete
    result = subprocess.run([sys.executable, "-m", "jobs.status", str(out), "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout)
    assert state["finished"] and state["committed"] == 1 and state["pending"] == [] and state["last_run"]["complete"]
    result = subprocess.run([sys.executable, "-m", "jobs.status", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "is not a latent dataset" in result.stderr
