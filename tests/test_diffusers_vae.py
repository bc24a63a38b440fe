"""diffusers autoencoders from local folders (`--vae diffusers:PATH`): presets, normalisation, identity, the job.

Tiny random-weight models of each supported class are saved with `save_pretrained` into a
temporary folder. The expected latents are written out here the way each family's diffusers
pipeline normalises `vae.encode(x).latent_dist`, independently of `vae/diffusers_vae.py`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import small_config
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLLTXVideo,
    AutoencoderKLMochi,
    AutoencoderKLWan,
)
from einops import rearrange
from safetensors.torch import load_file, save_file

from jobs.dataset.reader import load_sample, read_metadata
from jobs.inputs.tar_samples import read_shard
from jobs.inputs.video import read_clip
from jobs.orchestration.driver import run
from jobs.orchestration.worker import sample_seed
from jobs.precompute import main
from vae import CheckpointError, DiagonalGaussianDistribution, check_checkpoint, get_preset, load_vae
from vae.diffusers_folder import SUPPORTED_CLASSES, folder_sha256
from vae.diffusers_vae import INSTALL_HINT

REPO = Path(__file__).resolve().parents[1]
WAN_MEAN, WAN_STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]

# name: (class, tiny config, frames used in the tests)
TINY = {
    "wan": (
        AutoencoderKLWan,
        dict(
            base_dim=8,
            z_dim=4,
            dim_mult=[1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[True, True],
            latents_mean=WAN_MEAN,
            latents_std=WAN_STD,
            scale_factor_spatial=4,
        ),
        9,
    ),
    "ltx": (
        AutoencoderKLLTXVideo,
        dict(
            latent_channels=8,
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False),
            patch_size=2,
            scaling_factor=0.9,
        ),
        9,
    ),
    "cogvideox": (
        AutoencoderKLCogVideoX,
        dict(block_out_channels=(8, 8, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4),
        9,
    ),
    "hunyuan": (
        AutoencoderKLHunyuanVideo,
        dict(latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4),
        9,
    ),
    "mochi": (
        AutoencoderKLMochi,
        dict(
            encoder_block_out_channels=(32, 32, 32, 32),  # GroupNorm with 32 groups
            decoder_block_out_channels=(32, 32, 32, 32),
            latent_channels=4,
            layers_per_block=(1, 1, 1, 1, 1),
            latents_mean=(0.2, -0.1, 0.0, 0.3),
            latents_std=(0.5, 1.5, 1.0, 2.0),
            scaling_factor=0.8,
        ),
        7,
    ),
    "flux": (
        AutoencoderKL,
        dict(
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=4,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        3,
    ),
    "sdxl": (
        AutoencoderKL,
        dict(
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=4,
            scaling_factor=0.5,
            latents_mean=(0.1, 0.2, -0.3, 0.0),
            latents_std=(1.2, 0.8, 1.0, 2.0),
        ),
        3,
    ),
}

# (temporal, spatial compression, latent channels, frame rule) of the tiny models.
RULES = {
    "wan": (4, 4, 4, "1+4k"),
    "ltx": (4, 8, 8, "1+4k"),
    "cogvideox": (4, 8, 4, "1+4k"),
    "hunyuan": (4, 8, 4, "1+4k"),
    "mochi": (6, 8, 4, "1+6k"),
    "flux": (1, 2, 4, "any"),
    "sdxl": (1, 2, 4, "any"),
}


def _channels(values, z):
    return torch.as_tensor(values, dtype=z.dtype).view(1, -1, *[1] * (z.ndim - 2))


# How each family's pipelines normalise `z = vae.encode(x).latent_dist.sample()` (or `.mode()`).
PIPELINE = {
    # pipelines/wan/pipeline_wan_video2video.py: (z - mean) * (1 / std)
    "wan": lambda vae, z: (z - _channels(vae.config.latents_mean, z)) * (1.0 / _channels(vae.config.latents_std, z)),
    # pipelines/ltx/pipeline_ltx.py, _normalize_latents (mean, std are buffers of the model)
    "ltx": lambda vae, z: (
        (z - vae.latents_mean.view(1, -1, 1, 1, 1)) * vae.config.scaling_factor / vae.latents_std.view(1, -1, 1, 1, 1)
    ),
    # pipelines/cogvideo/pipeline_cogvideox_video2video.py
    "cogvideox": lambda vae, z: vae.config.scaling_factor * z,
    # pipelines/hunyuan_video/pipeline_hunyuan_video_image2video.py
    "hunyuan": lambda vae, z: z * vae.config.scaling_factor,
    # pipelines/mochi/pipeline_mochi.py decodes latent * std / scaling_factor + mean; this is its inverse
    "mochi": lambda vae, z: (
        (z - _channels(vae.config.latents_mean, z)) * vae.config.scaling_factor / _channels(vae.config.latents_std, z)
    ),
    # pipelines/flux/pipeline_flux_img2img.py (and SD3)
    "flux": lambda vae, z: (z - vae.config.shift_factor) * vae.config.scaling_factor,
    # pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl_img2img.py
    "sdxl": lambda vae, z: (
        (z - _channels(vae.config.latents_mean, z)) * vae.config.scaling_factor / _channels(vae.config.latents_std, z)
    ),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One `save_pretrained` folder per tiny model."""
    root = tmp_path_factory.mktemp("diffusers")
    out = {}
    for i, (name, (cls, config, _)) in enumerate(TINY.items()):
        torch.manual_seed(i)
        model = cls(**config)
        if name == "ltx":  # its normalisation constants are buffers in the weights
            model.latents_mean.copy_(torch.randn(8) * 0.3)
            model.latents_std.copy_(torch.rand(8) + 0.5)
        model.save_pretrained(root / name, safe_serialization=True)
        out[name] = root / name
    return out


def _video(name, batch=2, height=32, width=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, TINY[name][2], height, width, generator=g) * 2 - 1


def _reference(name, vae, x, generators=None):
    """Pipeline-normalised latents straight from diffusers, laid out `B C T h w`."""
    fold = TINY[name][0] is AutoencoderKL
    frames = rearrange(x, "b c t h w -> (b t) c h w") if fold else x
    with torch.no_grad():
        dist = vae.encode(frames).latent_dist
    z = dist.mode() if generators is None else dist.sample(generator=generators)
    latent = PIPELINE[name](vae, z)
    return rearrange(latent, "(b t) c h w -> b c t h w", t=x.shape[2]) if fold else latent, dist


@pytest.mark.parametrize("name", list(TINY))
def test_preset_rules_come_from_the_config(folders, name):
    preset = get_preset(f"diffusers:{folders[name]}")
    temporal, spatial, channels, frames = RULES[name]
    assert (preset.temporal_compression, preset.spatial_compression, preset.latent_channels) == (
        temporal,
        spatial,
        channels,
    )
    assert preset.frame_rule == frames and preset.size_multiple == spatial
    assert preset.name == f"diffusers:{TINY[name][0].__name__}:{name}" and preset.family.name == "diffusers"
    json.dumps(preset.describe())  # recorded in job.json
    x = _video(name, batch=1)
    with torch.no_grad():
        latent, _ = load_vae(f"diffusers:{folders[name]}").encode(x, sample=False)
    assert tuple(latent.shape[1:]) == preset.latent_shape(*x.shape[2:])
    if temporal > 1:
        with pytest.raises(ValueError, match=f"the rule is T = 1\\+{temporal}k"):
            preset.check_input(x.shape[2] + 1, 32, 64)


@pytest.mark.parametrize("name", list(TINY))
def test_latents_are_the_pipeline_normalisation(folders, name):
    model = load_vae(f"diffusers:{folders[name]}")
    vae = TINY[name][0].from_pretrained(folders[name], local_files_only=True, use_safetensors=True).eval()
    x = _video(name)
    with torch.no_grad():
        latent, posterior = model.encode(x, sample=False)
    expected, dist = _reference(name, vae, x)
    torch.testing.assert_close(latent, expected)
    assert posterior.mean.shape == latent.shape  # over the raw z, laid out B C T h w
    if TINY[name][0] is AutoencoderKL:
        raw = rearrange(dist.mean, "(b t) c h w -> b c t h w", t=x.shape[2])
    else:
        raw = dist.mean
    torch.testing.assert_close(posterior.mean, raw)

    # A sample with one generator per item: the same noise as diffusers' own sampling, item by item.
    with torch.no_grad():
        sampled, _ = model.encode(x, sample=True, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    if TINY[name][0] is AutoencoderKL:  # diffusers sees B*T images: sample our posterior over its moments
        moments = rearrange(dist.parameters, "(b t) c h w -> b c t h w", t=x.shape[2])
        z = DiagonalGaussianDistribution(moments).sample([torch.Generator().manual_seed(s) for s in (1, 2)])
        expected = PIPELINE[name](vae, z)
    else:
        expected, _ = _reference(name, vae, x, [torch.Generator().manual_seed(s) for s in (1, 2)])
    torch.testing.assert_close(sampled, expected)
    assert not torch.allclose(sampled, latent)

    # decode inverts the normalisation: the same video as diffusers decoding the raw mode.
    with torch.no_grad():
        video = model.decode(latent)
        reference = vae.decode(dist.mode()).sample
        if TINY[name][0] is AutoencoderKL:
            reference = rearrange(reference, "(b t) c h w -> b c t h w", t=x.shape[2])
    assert video.shape == reference.shape == x.shape
    torch.testing.assert_close(video, reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.normalise(model.denormalise(latent)), latent)


def test_published_configs_give_the_published_rules(tmp_path):
    """Full-size configs (built on the meta device, config.json only) give the released models' rules."""
    flux = get_preset("flux-ae")
    cases = [
        (AutoencoderKLWan, {}, (4, 8, 16, "1+4k")),  # Wan 2.1 (the class defaults)
        (
            AutoencoderKLWan,  # Wan 2.2 TI2V-5B
            dict(
                base_dim=160,
                decoder_base_dim=256,
                z_dim=48,
                is_residual=True,
                patch_size=2,
                in_channels=12,
                out_channels=12,
                scale_factor_spatial=16,
                latents_mean=[0.0] * 48,
                latents_std=[1.0] * 48,
            ),
            (4, 16, 48, "1+4k"),
        ),
        (AutoencoderKLLTXVideo, {}, (8, 32, 128, "1+8k")),  # LTX-Video 0.9.0
        (
            AutoencoderKLLTXVideo,  # LTX-Video 0.9.5 blocks, which state their ratios in the config
            dict(
                block_out_channels=(128, 256, 512, 1024, 2048),
                down_block_types=("LTXVideo095DownBlock3D",) * 4,
                downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
                spatio_temporal_scaling=(True,) * 4,
                layers_per_block=(4, 6, 6, 2, 2),
                spatial_compression_ratio=32,
                temporal_compression_ratio=8,
            ),
            (8, 32, 128, "1+8k"),
        ),
        (AutoencoderKLCogVideoX, {}, (4, 8, 16, "1+4k")),
        (AutoencoderKLHunyuanVideo, {}, (4, 8, 16, "1+4k")),
        (AutoencoderKLMochi, {}, (6, 8, 12, "1+6k")),
        (
            AutoencoderKL,  # FLUX.1
            dict(
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=16,
                scaling_factor=flux.scale_factor,
                shift_factor=flux.shift_factor,
                use_quant_conv=False,
                use_post_quant_conv=False,
            ),
            (1, 8, 16, "any"),
        ),
    ]
    stats = {"latents_mean": torch.randn(128), "latents_std": torch.rand(128) + 0.5}  # read for LTX only
    for i, (cls, config, rules) in enumerate(cases):
        folder = tmp_path / str(i)
        with torch.device("meta"):
            cls(**config).save_config(folder)
        save_file(stats, folder / "diffusion_pytorch_model.safetensors")
        preset = get_preset(f"diffusers:{folder}")
        got = (preset.temporal_compression, preset.spatial_compression, preset.latent_channels, preset.frame_rule)
        assert got == rules, cls.__name__
        # A config.json written by an older diffusers lacks keys: the class defaults fill them in.
        data = json.loads((folder / "config.json").read_text())
        defaults = {k: v for k, v in data.items() if k.startswith("_") or k in config}
        (folder / "config.json").write_text(json.dumps(defaults))
        assert get_preset(f"diffusers:{folder}").describe()["frames"] == rules[3]
    assert preset.scaling.startswith(flux.scaling)  # FLUX through diffusers: the project's own formula
    assert (preset.scale_factor, preset.shift_factor) == (flux.scale_factor, flux.shift_factor)
    ltx = get_preset(f"diffusers:{tmp_path / '2'}")
    assert ltx.params.latents_mean == tuple(float(str(v)) for v in stats["latents_mean"].numpy())
    assert "latents_std = [" in ltx.scaling and ltx.scale_factor == 1.0


def test_describe_records_the_constants(folders):
    described = get_preset(f"diffusers:{folders['wan']}").describe()
    assert described["params"]["latents_mean"] == tuple(WAN_MEAN)
    assert described["params"]["config"]["z_dim"] == 4 and "_class_name" not in described["params"]["config"]
    assert f"latents_mean = {WAN_MEAN}; latents_std = {WAN_STD}" in described["scaling"]
    assert "pipelines/wan/" in described["scaling"] and described["checkpoint"] == "wan"
    flux = get_preset(f"diffusers:{folders['flux']}").describe()
    assert (flux["scale_factor"], flux["shift_factor"]) == (0.3611, 0.1159) and flux["params"]["latents_mean"] is None


def test_folder_identity_is_stable(folders, tmp_path):
    folder = folders["wan"]
    listing = "".join(
        f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n"
        for n in ("config.json", "diffusion_pytorch_model.safetensors")
    )
    sha = folder_sha256(folder)
    assert sha == hashlib.sha256(listing.encode()).hexdigest()  # = `sha256sum config.json *.safetensors | sha256sum`
    moved = shutil.copytree(folder, tmp_path / "elsewhere")
    (moved / "notes.txt").write_text("not part of the model")
    assert folder_sha256(moved) == sha
    state = load_file(moved / "diffusion_pytorch_model.safetensors")
    state["quant_conv.bias"] = state["quant_conv.bias"] + 1
    save_file(state, moved / "diffusion_pytorch_model.safetensors")
    assert folder_sha256(moved) != sha


def test_unusable_folders_are_refused_with_a_reason(folders, tmp_path):
    torch.manual_seed(0)
    AutoencoderKLWan(**TINY["wan"][1]).save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(CheckpointError, match=r"only pickle weights \(diffusion_pytorch_model.bin\)"):
        get_preset(f"diffusers:{tmp_path / 'pickled'}")

    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    with pytest.raises(ValueError, match="'AutoencoderTiny' is not supported; supported: AutoencoderKL, "):
        get_preset(f"diffusers:{tmp_path / 'tiny'}")

    pipeline = tmp_path / "pipeline"
    shutil.copytree(folders["wan"], pipeline / "vae")
    with pytest.raises(FileNotFoundError, match=r"no config.json in .*pipeline .*is the VAE in .*pipeline/vae\?"):
        get_preset(f"diffusers:{pipeline}")
    assert get_preset(f"diffusers:{pipeline / 'vae'}").name == "diffusers:AutoencoderKLWan:pipeline/vae"

    broken = shutil.copytree(folders["wan"], tmp_path / "broken")
    state = load_file(broken / "diffusion_pytorch_model.safetensors")
    del state["decoder.conv_in.weight"]
    state["encoder.extra.weight"] = torch.zeros(1)
    save_file(state, broken / "diffusion_pytorch_model.safetensors")
    for check in (lambda: check_checkpoint(f"diffusers:{broken}"), lambda: load_vae(f"diffusers:{broken}")):
        with pytest.raises(CheckpointError, match="decoder.conv_in.weight") as info:
            check()
        assert "encoder.extra.weight" in str(info.value)

    state = load_file(folders["wan"] / "diffusion_pytorch_model.safetensors")
    state["decoder.conv_in.bias"] = torch.zeros(5)
    save_file(state, broken / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"decoder.conv_in.bias \(5,\) != \(8,\)"):
        check_checkpoint(f"diffusers:{broken}")
    with pytest.raises(CheckpointError, match="cannot load AutoencoderKLWan: .* size mismatch for decoder.conv_in"):
        load_vae(f"diffusers:{broken}")

    weights = folders["wan"] / "diffusion_pytorch_model.safetensors"
    with pytest.raises(CheckpointError, match="is the checkpoint"):
        check_checkpoint(f"diffusers:{folders['wan']}", weights)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vae", "diffusers:{folder}", "--checkpoint", "{weights}"], "is the checkpoint (weights and config)"),
        (["--vae", "diffusers:{tmp}/nowhere"], "error: diffusers model folder not found: "),
        (
            ["--vae", "diffusers:{folder}", "--set", "video.num_frames=8"],
            "8 frames (the rule is T = 1+4k; e.g. 5 or 9)",
        ),
    ],
)
def test_unusable_arguments_exit_2_with_one_line(args, message, folders, demo_shards, tmp_path, capsys):
    weights = folders["wan"] / "diffusion_pytorch_model.safetensors"
    argv = ["--input", str(demo_shards[0]), "--output", str(tmp_path / "o")]
    argv += [a.format(folder=folders["wan"], weights=weights, tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


# diffusers hidden as if it were not installed: any import of it fails.
_WITHOUT_DIFFUSERS = """
import sys

class NoDiffusers:
    def find_spec(self, name, path=None, target=None):
        if name == "diffusers" or name.startswith("diffusers."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoDiffusers())
from jobs.precompute import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_without_diffusers_the_job_says_how_to_install_it(folders, demo_shards, tmp_path):
    argv = ["--input", str(demo_shards[0]), "--output", str(tmp_path / "o"), "--vae", f"diffusers:{folders['wan']}"]
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_DIFFUSERS, *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"error: {INSTALL_HINT}"
    assert "pip install -e '.[diffusers]'" in INSTALL_HINT
    listing = subprocess.run(
        [sys.executable, "-c", _WITHOUT_DIFFUSERS, "--list-vaes"], cwd=REPO, capture_output=True, text=True
    )
    assert listing.returncode == 0 and ", ".join(SUPPORTED_CLASSES) in listing.stdout


@pytest.mark.slow
def test_precompute_end_to_end(ray_cluster, folders, demo_shards, tmp_path, monkeypatch):
    """A real job on Ray with `--vae diffusers:<relative path>`; workers load the folder themselves."""
    monkeypatch.chdir(folders["wan"].parent)
    out = tmp_path / "out"
    config = small_config(
        demo_shards[:1],
        out,
        vae={"name": "diffusers:wan"},
        video={"num_frames": 9, "height": 32, "width": 32},
        latents={"store_posterior": True},
    )
    summary = run(config)
    assert summary.complete and summary.ok == 4 and summary.errors == 0

    sha = folder_sha256(folders["wan"])
    rows = read_metadata(out).to_pylist()
    assert {r["vae"] for r in rows} == {"diffusers:AutoencoderKLWan:wan"}
    assert {r["vae_checkpoint"] for r in rows} == {"wan"} and {r["vae_checkpoint_sha256"] for r in rows} == {sha}
    assert {(r["scale_factor"], r["shift_factor"]) for r in rows} == {(1.0, 0.0)}
    assert all(f"latents_mean = {WAN_MEAN}; latents_std = {WAN_STD}" in r["scaling"] for r in rows)
    assert rows[0]["latent_shape"] == [4, 3, 8, 8]

    job = json.loads((out / "job.json").read_text())
    vae = job["settings"]["vae"]
    assert vae["name"] == "diffusers:AutoencoderKLWan:wan" and vae["checkpoint_sha256"] == sha
    assert vae["params"]["latents_mean"] == WAN_MEAN and vae["params"]["latents_std"] == WAN_STD
    assert vae["params"]["class_name"] == "AutoencoderKLWan" and vae["frames"] == "1+4k"
    assert job["config"]["vae"]["name"] == f"diffusers:{folders['wan']}"  # made absolute for the workers

    model = load_vae(f"diffusers:{folders['wan']}")
    by_key = {r["key"]: r for r in rows}
    sample = next(iter(read_shard(str(demo_shards[0]), print)))
    clip = read_clip(sample.files["mp4"], 9, 32, 32)
    with torch.inference_mode():
        gen = torch.Generator().manual_seed(sample_seed(0, sample.key))
        latent, posterior = model.encode(clip.pixels[None], sample=True, generator=[gen])
    stored = load_sample(out, by_key[sample.key])
    torch.testing.assert_close(stored["latent"], latent[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stored["mean"], posterior.mean[0], atol=1e-5, rtol=1e-5)
