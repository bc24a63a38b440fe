"""Loading weights: safetensors only, strict keys with named mismatches, meta-device build."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch
from safetensors.torch import save_file

from vae import CheckpointError, check_checkpoint, get_preset, load_vae


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    model = load_vae("flux-ae-tiny", seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file(model.state_dict(), path)
    return path, model


def test_roundtrip_is_exact(weights):
    path, model = weights
    loaded = load_vae("flux-ae-tiny", path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(1, 3, 2, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded.encode(x, sample=False)[0], model.encode(x, sample=False)[0])


def test_dtype_and_random_init_is_seeded(weights):
    path, _ = weights
    half = load_vae("flux-ae-tiny", path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    a, b = load_vae("flux-ae-tiny", seed=1), load_vae("flux-ae-tiny", seed=1)
    assert torch.equal(a.encoder.conv_in.weight, b.encoder.conv_in.weight)
    assert not torch.equal(a.encoder.conv_in.weight, load_vae("flux-ae-tiny", seed=2).encoder.conv_in.weight)


def test_mismatches_are_named(weights, tmp_path):
    path, model = weights
    state = dict(model.state_dict())
    del state["encoder.conv_in.weight"]
    state["encoder.extra.weight"] = torch.zeros(1)
    state["decoder.conv_out.bias"] = torch.zeros(5)
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad)
    for check in (lambda: load_vae("flux-ae-tiny", bad), lambda: check_checkpoint("flux-ae-tiny", bad)):
        with pytest.raises(CheckpointError) as info:
            check()
        message = str(info.value)
        assert "1 missing keys: encoder.conv_in.weight" in message
        assert "1 unexpected keys: encoder.extra.weight" in message
        assert "decoder.conv_out.bias (5,) != (3,)" in message
    with pytest.raises(CheckpointError, match="does not fit VAE 'flux-ae'"):
        check_checkpoint("flux-ae", path)


def test_prefixed_keys(weights, tmp_path):
    _, model = weights
    prefixed = tmp_path / "prefixed.safetensors"
    save_file({f"vae.{k}": v for k, v in model.state_dict().items()}, prefixed)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_vae("flux-ae-tiny", prefixed)
    preset = dataclasses.replace(get_preset("flux-ae-tiny"), name="flux-ae-tiny-prefixed", key_prefixes=("vae.",))
    loaded = load_vae(preset, prefixed)
    assert torch.equal(loaded.decoder.conv_out.weight, model.decoder.conv_out.weight)


def test_pickle_files_are_refused_unread(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    path = tmp_path / "model.ckpt"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError, match="only safetensors checkpoints are loaded"):
        load_vae("flux-ae-tiny", path)
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_vae("flux-ae-tiny", fake)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_vae("flux-ae-tiny", tmp_path / "missing.safetensors")


def test_tensors_are_converted_one_at_a_time_as_they_are_read(weights, tmp_path):
    """Each float tensor reaches the model's dtype as it is read (no whole float32 copy beside the
    bfloat16 one on the device); other tensors keep theirs. The conversion is the same as a
    whole-dict one."""
    from vae.checkpoint import read_state_dict

    path, model = weights
    mixed = tmp_path / "mixed.safetensors"
    save_file({"w": torch.rand(3, 4), "steps": torch.tensor([7], dtype=torch.int64)}, mixed)
    state = read_state_dict(mixed, dtype=torch.bfloat16)
    assert state["w"].dtype == torch.bfloat16 and state["steps"].dtype == torch.int64
    half = load_vae("flux-ae-tiny", path, dtype=torch.bfloat16)
    for name, tensor in half.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name].to(torch.bfloat16)), name
