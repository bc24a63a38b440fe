"""Reading ahead across shards (`run.read_ahead`): an actor handed its next shard decodes that
shard's first samples while it finishes the current one, and the output is the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import in_process_encoder, small_config

from jobs.dataset.faults import FAULT_ENV
from jobs.dataset.reader import load_sample, read_metadata
from jobs.demo_data import write_demo_dataset
from jobs.inputs.decode_pool import DecodePool
from jobs.inputs.shards import Shard
from jobs.inputs.tar_samples import ShardReadError
from jobs.orchestration import worker
from jobs.orchestration.driver import run
from jobs.orchestration.worker import ShardDone, ShardEncoder
from vae import load_vae


def _noting_submits(encoder: ShardEncoder) -> list[str]:
    """The keys handed to the encoder's decoding processes, in order, from now on."""
    keys: list[str] = []
    submit = encoder.decoder.submit

    def noting(data, spec, key=""):  # type: ignore[no-untyped-def]
        keys.append(key)
        return submit(data, spec, key)

    encoder.decoder.submit = noting  # type: ignore[method-assign]
    return keys


def _done(messages) -> ShardDone:  # type: ignore[no-untyped-def]
    (done,) = [m for m in messages if isinstance(m, ShardDone)]
    return done


def _keys(root, shard: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [r["key"] for r in read_metadata(root).to_pylist() if r["shard"] == f"latents/{shard}.tar"]


def test_the_next_shard_is_decoding_before_this_one_commits_and_the_output_is_the_same(demo_shards, tmp_path):
    outputs = []
    for ahead in (True, False):
        encoder, plan = in_process_encoder(small_config(demo_shards, tmp_path / f"out-{ahead}"))
        submitted = _noting_submits(encoder)
        a, b, c = plan.shards
        try:
            at_commit: list[str] = []
            for message in encoder.encode_shard(a, then=b if ahead else None):
                if isinstance(message, ShardDone):
                    at_commit = list(submitted)
                    assert message.read_ahead == 0
            done_b = _done(encoder.encode_shard(b, then=c if ahead else None))
            done_c = _done(encoder.encode_shard(c))
        finally:
            encoder.decoder.close()
        keys_b = _keys(plan.root, b.name)
        assert len(keys_b) == 4
        if ahead:  # b's samples (4, under the decode depth of 6) were all decoding when a committed, once each
            assert set(keys_b) <= set(at_commit)
            assert done_b.read_ahead == done_c.read_ahead == 4
        else:
            assert not set(keys_b) & set(at_commit) and done_b.read_ahead == 0
        assert all(submitted.count(k) == 1 for k in keys_b)
        assert done_b.decode_wait_s >= 0 and done_b.marker["ok"] == 4
        outputs.append(plan.root)
    rows = [read_metadata(out).to_pylist() for out in outputs]
    assert rows[0] == rows[1] and [r["status"] for r in rows[0]] == ["ok"] * 12
    for row in rows[0]:
        assert torch.equal(load_sample(outputs[0], row)["latent"], load_sample(outputs[1], row)["latent"])


def test_the_decoding_processes_hold_a_full_window_whenever_the_model_encodes(tmp_path):
    """A sample leaves the decode window only for the next one to take its place: while the model
    encodes a batch, the decoding processes hold the next `batch_size + 2 * decode_threads` samples
    (a window drained of every decoded sample before each batch left them idle while the model ran,
    and the model then waited for the next batch's decodes)."""
    (shard,) = write_demo_dataset(tmp_path / "in", shards=1, samples_per_shard=16, seed=0)
    encoder, plan = in_process_encoder(small_config([shard], tmp_path / "out"))  # batches of 2, 2 processes
    submitted, resolved, outstanding = _noting_submits(encoder), [], []
    resolve, run_model = encoder._resolve, encoder._run_model

    def noting_resolve(pending):  # type: ignore[no-untyped-def]
        resolved.append(pending.raw.key)
        return resolve(pending)

    def noting_run_model(items):  # type: ignore[no-untyped-def]
        outstanding.append(len(submitted) - len(resolved))  # handed to the decoding processes, not yet taken
        return run_model(items)

    encoder._resolve, encoder._run_model = noting_resolve, noting_run_model  # type: ignore[method-assign]
    try:
        assert _done(encoder.encode_shard(plan.shards[0])).marker["ok"] == 16
    finally:
        encoder.decoder.close()
    depth = 2 + 2 * 2
    # Batch j is encoded once sample 2j + depth is read: each of the first (16 - depth) / 2, then the tail.
    assert outstanding == [depth] * 5 + [4, 2, 0]


def test_the_next_shard_is_read_into_the_room_this_ones_window_leaves_as_it_drains(demo_shards, tmp_path):
    """Under a byte budget that this shard's window fills (a few large clips), the next shard's
    samples are read as this one's last samples leave the window, not only into what was left
    when its last sample was read (one sample, then none for the rest of the shard)."""
    config = small_config(demo_shards, tmp_path / "out")
    encoder, plan = in_process_encoder(config)
    encoder.config.limits.window_bytes = 4 * encoder.clip_bytes  # three samples and a bit
    a, b, _ = plan.shards
    try:
        _done(encoder.encode_shard(a, then=b))
        done_b = _done(encoder.encode_shard(b))
    finally:
        encoder.decoder.close()
    assert done_b.read_ahead == 4 and done_b.marker["ok"] == 4  # all of b, read while a finished


def test_a_shard_read_ahead_but_not_given_next_is_dropped_and_read_again_when_it_comes(demo_shards, tmp_path):
    encoder, plan = in_process_encoder(small_config(demo_shards, tmp_path / "out"))
    submitted = _noting_submits(encoder)
    a, b, c = plan.shards
    try:
        _done(encoder.encode_shard(a, then=b))
        ahead = encoder._ahead
        assert ahead is not None and ahead.shard == b
        done_c = _done(encoder.encode_shard(c))  # another actor took b over
        assert done_c.read_ahead == 0 and encoder._ahead is None
        assert all(p.clip is None or p.clip.cancelled() or p.clip.done() for p in ahead.window) and not ahead.window
        done_b = _done(encoder.encode_shard(b))
    finally:
        encoder.decoder.close()
    assert done_b.read_ahead == 0 and done_b.marker["ok"] == 4
    keys_b = _keys(plan.root, b.name)
    assert len(keys_b) == 4 and all(submitted.count(k) >= 1 for k in keys_b)
    assert [r["status"] for r in read_metadata(plan.root).to_pylist()] == ["ok"] * 12


def test_a_next_shard_that_cannot_be_read_fails_its_own_attempt_only(demo_shards, tmp_path):
    encoder, plan = in_process_encoder(small_config(demo_shards[:1], tmp_path / "out"))
    missing = Shard(source=str(tmp_path / "missing.tar"), name="missing")
    try:
        done = _done(encoder.encode_shard(plan.shards[0], then=missing))
        assert done.marker["ok"] == 4
        with pytest.raises(ShardReadError, match="missing.tar"):
            list(encoder.encode_shard(missing))
        assert encoder._ahead is None
    finally:
        encoder.decoder.close()


def test_an_encoder_decodes_its_first_shard_while_its_model_loads(demo_shards, tmp_path, monkeypatch):
    submitted: list[str] = []
    submit = DecodePool.submit

    def noting(self, data, spec, key=""):  # type: ignore[no-untyped-def]
        submitted.append(key)
        return submit(self, data, spec, key)

    monkeypatch.setattr(DecodePool, "submit", noting)
    decoding_at_load: list[int] = []

    def loading(*args, **kwargs):  # type: ignore[no-untyped-def]
        decoding_at_load.append(len(submitted))
        return load_vae(*args, **kwargs)

    monkeypatch.setattr(worker, "load_vae", loading)
    encoder, plan = in_process_encoder(small_config(demo_shards, tmp_path / "out"), first=0)
    try:
        assert decoding_at_load == [4]  # the shard's four samples were decoding when the model began to load
        done = _done(encoder.encode_shard(plan.shards[0]))
    finally:
        encoder.decoder.close()
    assert done.read_ahead == 4 and done.marker["ok"] == 4 and len(submitted) == len(set(submitted)) == 4


@pytest.mark.slow
def test_each_actor_is_first_given_the_shard_it_read_while_it_started(demo_shards, tmp_path):
    """Two actors, three shards; the job in a process of its own, its embedded Ray cluster slowed by
    five seconds per commit (`slow-commit=5`), so that the first actor ready does not finish the
    other's first shard before that one is ready too (the run starts with the first actor ready; a
    second per commit was not enough on a loaded machine)."""
    out = tmp_path / "out"
    args = ["--input", f"{demo_shards[0].parent}/*.tar", "--output", str(out), "--workers", "2"]
    for setting in ("run.batch_size=2", "video.num_frames=8", "video.height=64", "video.width=64"):
        args += ["--set", setting]
    result = subprocess.run(
        [sys.executable, "-m", "jobs.precompute", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, FAULT_ENV: "slow-commit=5"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] == 12 and len(report["actors"]) == 2
    for actor in report["actors"].values():  # its first shard's four samples at least
        assert actor["read_ahead"] >= 4


@pytest.mark.slow
def test_the_driver_hands_each_actor_its_next_shard_to_read_ahead(demo_shards, tmp_path, ray_cluster):
    reads, waits = [], []
    for ahead in (True, False):
        config = small_config(demo_shards, tmp_path / f"out-{ahead}", run={"workers": 1, "read_ahead": ahead})
        summary = run(config)
        assert summary.complete and summary.ok == 12
        (actor,) = summary.actors.values()
        reads.append(actor["read_ahead"])
        waits.append(actor["decode_wait_s"])
    assert reads == [12, 0]  # each shard: the first while the actor started, the others with the one before
    assert waits[1] > 0  # without reading ahead, the model waits for each shard's first decodes at least
