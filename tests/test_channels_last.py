"""`run.channels_last`: the VAE's weights and its input in channels-last layout give the same
latents up to float rounding, and the job really runs them that way."""

from __future__ import annotations

import pytest
import torch
from conftest import in_process_encoder, small_config

from jobs.dataset.reader import load_sample, read_metadata
from jobs.demo_data import write_demo_dataset
from vae import channels_last, channels_last_input, encode_video, get_preset, load_vae


def _layout_ok(model: torch.nn.Module) -> bool:
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    weights = [p for p in model.parameters() if p.dim() in formats]
    return bool(weights) and all(p.is_contiguous(memory_format=formats[p.dim()]) for p in weights)


@pytest.mark.parametrize("name", ["flux-ae-tiny", "hunyuan-vae-tiny", "dc-ae-tiny"])
def test_a_channels_last_model_encodes_the_same_latents(name):
    preset = get_preset(name)
    model = load_vae(preset, None, device="cpu", dtype=torch.float32, seed=0)
    fast = channels_last(load_vae(preset, None, device="cpu", dtype=torch.float32, seed=0))
    assert _layout_ok(fast) and not _layout_ok(model)
    frames = 8 if name == "dc-ae-tiny" else 5
    x = torch.rand(2, 3, frames, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        z, _ = encode_video(model, preset, x, sample=False)
        z_fast, _ = encode_video(fast, preset, channels_last_input(preset, x), sample=False)
    assert torch.allclose(z, z_fast, atol=1e-4, rtol=1e-4)


def test_the_job_runs_a_channels_last_model_on_channels_last_input(tmp_path):
    shards = write_demo_dataset(tmp_path / "data", shards=1, samples_per_shard=3, seed=4)
    outputs, fingerprints = [], []
    for on in (False, True):
        config = small_config(shards, tmp_path / f"out-{on}", run={"channels_last": on})
        config.vae.name, config.video.num_frames = "hunyuan-vae-tiny", 9
        encoder, plan = in_process_encoder(config)
        inputs: list[bool] = []

        def note_layout(module: torch.nn.Module, args: tuple, seen: list[bool] = inputs) -> None:
            seen.append(args[0].is_contiguous(memory_format=torch.channels_last_3d))

        encoder.model.encoder.register_forward_pre_hook(note_layout)
        list(encoder.encode_shard(plan.shards[0]))
        assert _layout_ok(encoder.model) == on
        assert inputs and all(inputs) == on  # the model saw the layout it was set up for
        outputs.append(plan.root)
        fingerprints.append(plan.fingerprint)
    assert fingerprints[0] != fingerprints[1]  # other last bits: another dataset
    rows = [read_metadata(out).to_pylist() for out in outputs]
    assert [r["status"] for r in rows[0]] == [r["status"] for r in rows[1]] == ["ok"] * 3
    for a, b in zip(*rows):
        za, zb = load_sample(outputs[0], a)["latent"], load_sample(outputs[1], b)["latent"]
        assert (za - zb).abs().max() < 1e-3  # a posterior sample (same noise) of a mean moved by rounding
