from __future__ import annotations

import re
from pathlib import Path

import pytest

from jobs.demo_data import write_demo_dataset
from jobs.orchestration.config import JobConfig, UsageError, _choice_fields, apply_override, load_config
from jobs.orchestration.settings import check_config, clip_request, fingerprint
from vae import get_preset

REPO = Path(__file__).resolve().parents[1]


def test_file_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("vae:\n  name: flux-ae\nvideo:\n  num_frames: 33\ninput: data/x.tar\n")
    config = load_config(path, ["video.height=128", "latents.dtype=bfloat16", "run.address=null"])
    assert config.vae.name == "flux-ae"
    assert config.video.num_frames == 33 and config.video.height == 128 and config.video.width == 256
    assert config.input == ["data/x.tar"]  # a single string where a list is expected
    assert config.latents.dtype == "bfloat16"
    assert config.run.address is None


def test_json_config(tmp_path):
    path = tmp_path / "job.json"
    path.write_text('{"video": {"width": 320}, "vae": {"sample": false}}')
    config = load_config(path)
    assert config.video.width == 320 and config.vae.sample is False


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("video.num_frame=3", "unknown config key 'video.num_frame' (did you mean 'num_frames'?)"),
        ("vid.num_frames=3", "unknown config key 'vid'"),
        ("video.num_frames=many", "video.num_frames: expected an integer"),
        ("vae.sample=1", "vae.sample: expected true or false"),
        ("video", "not of the form key=value"),
        ("run.decode_nice=19", "config key 'run.decode_nice' is now 'run.decode_priority'"),
    ],
)
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, [override])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("video:\n  frames: 3\n")
    with pytest.raises(ValueError, match="unknown config key 'video.frames'"):
        load_config(path)


def test_validate():
    config = JobConfig(input=["x.tar"], output="out")
    config.validate()
    config.video.num_frames = 0
    with pytest.raises(ValueError, match="video.num_frames must be at least 1"):
        config.validate()
    config.video.num_frames = 8
    config.latents.dtype = "float64"
    with pytest.raises(ValueError, match="latents.dtype must be one of"):
        config.validate()
    config.latents.dtype = "float32"
    config.run.decode_priority = "nice"
    message = "run.decode_priority must be one of auto, idle, low, normal; got 'nice'"
    with pytest.raises(ValueError, match=re.escape(message)):
        config.validate()
    for level in ("auto", "idle", "low", "normal"):
        config.run.decode_priority = level
        config.validate()


def test_fingerprint_is_stable_and_order_free():
    a = fingerprint({"video": {"num_frames": 17, "height": 256}, "vae": "x"})
    b = fingerprint({"vae": "x", "video": {"height": 256, "num_frames": 17}})
    assert a == b
    assert a != fingerprint({"vae": "x", "video": {"height": 256, "num_frames": 33}})


def test_choices_are_literal_types_checked_in_one_place():
    # Every choice of the config is a Literal type: the one check reads the allowed values from it.
    assert {path for path, _, _ in _choice_fields(JobConfig())} == {
        "vae.dtype",
        "vae.tiling.mode",
        "vae.tiling.causal_norm",
        "video.resize",
        "video.clips",
        "latents.dtype",
        "run.decode_priority",
    }
    config = load_config(None, ["vae.tiling.mode=tiled", "vae.dtype=float64", "input=x.tar", "output=out"])
    with pytest.raises(UsageError, match=re.escape("vae.dtype must be one of auto, float32, bfloat16, float16; got")):
        config.validate()
    config.vae.dtype = "auto"
    with pytest.raises(UsageError, match=re.escape("vae.tiling.mode must be one of off, opensora, auto; got 'tiled'")):
        config.validate()
    with pytest.raises(UsageError, match="vae.tiling.causal_norm: expected a string"):
        load_config(None, ["vae.tiling.causal_norm=3"])
    config.vae.tiling.mode = "opensora"
    config.validate()


def test_a_bare_off_is_the_choice_not_a_boolean(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("vae:\n  tiling:\n    mode: off\n")
    assert load_config(path).vae.tiling.mode == "off"
    assert load_config(None, ["vae.tiling.mode=off"]).vae.tiling.mode == "off"
    with pytest.raises(UsageError, match="vae.tiling.causal_norm: expected a string, got True"):
        load_config(None, ["vae.tiling.causal_norm=yes"])


def test_a_number_in_exponent_form_is_a_number():
    assert load_config(None, ["limits.decode_timeout_s=1e-9"]).limits.decode_timeout_s == 1e-9
    with pytest.raises(UsageError, match="expected a number"):
        load_config(None, ["limits.decode_timeout_s=soon"])


def test_the_open_sora_bucket_config_suits_the_causal_vae_only_where_its_frame_rule_holds(tmp_path):
    (shard,) = write_demo_dataset(tmp_path / "data", shards=1, samples_per_shard=1, seed=0)
    config = load_config(REPO / "configs" / "opensora-256px.yaml", [f"input=[{shard}]", f"output={tmp_path / 'o'}"])
    check_config(config)
    table = clip_request(config, get_preset("hunyuan-vae")).buckets
    assert table is not None and table.frame_counts() == {1, 33, 65, 97, 129}
    assert {(b.aspect, b.height, b.width) for b in table.buckets() if b.num_frames == 33} >= {("16:9", 192, 336)}
    apply_override(config, "vae.name=dc-ae-tiny")  # frames 1 or 4k
    with pytest.raises(UsageError, match=r"frame counts \[33, 65, 97, 129\] do not suit VAE 'dc-ae-tiny'"):
        check_config(config)
    apply_override(config, "video.buckets={256px: {32: [1.0, 2]}}")
    assert clip_request(config, get_preset("dc-ae-tiny")).buckets.buckets()[0].height % 32 == 0  # auto: x32
    apply_override(config, "video.bucket_multiple=16")
    with pytest.raises(
        UsageError, match="bucket_multiple = 16 is not a multiple of VAE 'dc-ae-tiny''s size multiple 32"
    ):
        check_config(config)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("video.buckets={256px: {17: [2.0, 4]}}", r"video.buckets.256px.17: probability must be in \(0, 1\]"),
        ("video.buckets={big: {17: [1.0, 4]}}", "video.buckets.big: unknown resolution"),
        ("video.buckets=[1, 2]", "video.buckets: expected a mapping"),
        ("video.clips=last", "video.clips must be one of first, middle, random, uniform, every"),
        ("video.fps_max=0", "video.fps_max must be positive"),
        ("video.max_clips=0", "video.max_clips must be at least 1"),
    ],
)
def test_bad_video_settings_are_named(override, message):
    config = JobConfig(input=["x.tar"], output="o")
    with pytest.raises(UsageError, match=message):
        apply_override(config, override)
        config.validate()
