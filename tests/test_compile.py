"""`run.compile`: the VAE's encoder through `torch.compile` (inductor), in the job and alone."""

from __future__ import annotations

import pytest
import torch
from conftest import in_process_encoder, small_config
from torch._dynamo.utils import counters

from jobs.dataset.reader import load_sample, read_metadata
from jobs.demo_data import write_demo_dataset
from vae import compile_encoder


def test_a_model_without_an_encoder_module_is_refused():
    with pytest.raises(ValueError, match="Linear has no encoder module to compile"):
        compile_encoder(torch.nn.Linear(2, 2))


@pytest.mark.slow  # inductor compiles the encoder's kernels: about half a minute on 2 CPU cores
def test_the_job_encodes_with_the_compiled_encoder(tmp_path):
    """The actor's model runs the graphs inductor made; the latents are the eager ones up to rounding,
    and the fingerprint says they were computed another way."""
    shards = write_demo_dataset(tmp_path / "data", shards=1, samples_per_shard=2, seed=5)
    outputs, fingerprints = [], []
    for on in (False, True):
        config = small_config(shards, tmp_path / f"out-{on}", run={"compile": on})
        encoder, plan = in_process_encoder(config)
        counters.clear()
        try:
            list(encoder.encode_shard(plan.shards[0]))
        finally:
            encoder.decoder.close()
        # One batch of 2 clips: one graph compiled, and run.
        assert (counters["stats"]["unique_graphs"] >= 1) == on
        outputs.append(plan.root)
        fingerprints.append(plan.fingerprint)
    assert fingerprints[0] != fingerprints[1]
    rows = [read_metadata(out).to_pylist() for out in outputs]
    assert [r["status"] for r in rows[1]] == ["ok"] * 2
    for a, b in zip(*rows):
        za, zb = load_sample(outputs[0], a)["latent"], load_sample(outputs[1], b)["latent"]
        assert (za - zb).abs().max() < 1e-4  # the same noise on a mean moved by rounding
