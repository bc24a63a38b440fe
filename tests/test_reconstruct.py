from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import av
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from jobs import precompute, reconstruct
from jobs.dataset.reader import load_sample, read_metadata
from jobs.demo_data import demo_sample, write_demo_dataset, write_shard
from jobs.inputs.tar_samples import read_shard, split_sample
from jobs.inputs.video import read_clip
from jobs.orchestration.config import JobConfig, RunConfig, VAEConfig, VideoConfig
from jobs.orchestration.driver import prepare_output
from jobs.orchestration.settings import check_config, make_plan
from jobs.orchestration.worker import ShardEncoder, sample_seed
from jobs.quality.media import read_image

REPO = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = REPO / "configs" / "demo-vae.safetensors"


def encode_in_process(config: JobConfig) -> None:
    """Runs the job's own planning and encoder class without Ray (the fast tests need no cluster)."""
    shards = check_config(config)
    plan = make_plan(config, shards, has_gpus=False)
    prepare_output(plan)
    encoder = ShardEncoder(plan.config, str(plan.root), plan.constants)
    for shard in shards:
        list(encoder.encode_shard(shard))


@pytest.fixture(scope="module")
def random_job(tmp_path_factory) -> Path:
    """Two shards of two demo videos, encoded at 6x64x64 by a randomly initialised tiny FLUX AE."""
    root = tmp_path_factory.mktemp("recon")
    write_demo_dataset(root / "data", shards=2, samples_per_shard=2, seed=0)
    config = JobConfig(
        input=[str(root / "data" / "shard-*.tar")],
        output=str(root / "latents"),
        vae=VAEConfig(name="flux-ae-tiny", seed=3),
        video=VideoConfig(num_frames=6, height=64, width=64),
        run=RunConfig(batch_size=2, decode_threads=1),
    )
    encode_in_process(config)
    return root / "latents"


def test_writes_videos_previews_and_report(random_job, tmp_path, capsys):
    out = tmp_path / "report"
    args = ["--latents", str(random_job), "--output", str(out), "--limit", "3", "--preview-frames", "4"]
    assert reconstruct.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["key"] for s in report["samples"]] == ["clip-000000", "clip-000001", "clip-000002"]
    assert report["weights"] == "random init, seed 3" and report["dtype"] == "float32"
    for sample in report["samples"]:
        assert 0 < sample["psnr"] < 60 and -1 <= sample["ssim"] <= 1
        with av.open(str(out / sample["video"])) as container:
            stream = container.streams.video[0]
            frames = list(container.decode(stream))
            assert float(stream.average_rate) == sample["fps"]
        assert len(frames) == 6 and (frames[0].height, frames[0].width) == (64, 64)
        assert read_image(out / sample["preview"]).shape == (2 * 64 + 2, 4 * 64 + 3 * 2, 3)
    mean = sum(s["psnr"] for s in report["samples"]) / 3
    assert report["mean"]["psnr"] == pytest.approx(mean, abs=1e-3)
    table = (out / "report.md").read_text()
    assert "| clip-000002 | 6 | 64x64 |" in table and "**mean** (3)" in table
    printed = capsys.readouterr().out
    assert f"mean PSNR {mean:.2f} dB" in printed and str(out / "previews") in printed


def test_a_job_recorded_with_a_key_since_renamed_still_loads(random_job):
    """`job.json` of an earlier version may hold a key this one renamed (`config.RETIRED`)."""
    job_file = random_job / "job.json"
    original = job_file.read_text()
    recorded = json.loads(original)
    recorded["config"]["run"]["decode_nice"] = 19
    job_file.write_text(json.dumps(recorded))
    try:
        assert reconstruct.load_job(random_job).config.run.decode_priority == "auto"
    finally:
        job_file.write_text(original)


def test_rebuilds_the_job_model_and_clip(random_job):
    """The rebuilt random-init VAE, fed the re-read source clip, gives back the stored latent."""
    job = reconstruct.load_job(random_job)
    model, _, _ = reconstruct.build_model(job, None, torch.device("cpu"))
    row = next(r for r in read_metadata(random_job).to_pylist() if r["key"] == "clip-000003")
    video = next(split_sample(s, ["mp4"]).video for s in read_shard(row["source"], print) if s.key == row["key"])
    clip = read_clip(video, row["num_frames"], row["height"], row["width"]).pixels
    generator = torch.Generator().manual_seed(sample_seed(job.config.vae.seed, row["key"]))
    with torch.inference_mode():
        latent, _ = model.encode(clip[None], sample=True, generator=[generator])
    torch.testing.assert_close(latent[0], load_sample(random_job, row)["latent"])


def test_keys_select_samples_in_the_given_order(random_job, tmp_path):
    out = tmp_path / "report"
    args = ["--latents", str(random_job), "--output", str(out), "--keys", "clip-000003,clip-000001"]
    assert reconstruct.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["key"] for s in report["samples"]] == ["clip-000003", "clip-000001"]
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["clip-000001.mp4", "clip-000003.mp4"]


def test_bad_input_is_one_line_and_exit_2(random_job, tmp_path, capsys):
    def fails(args: list[str], message: str) -> None:
        assert reconstruct.main([*args, "--output", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and message in err, err

    fails(["--latents", str(tmp_path)], "is not a latent dataset (no job.json)")
    fails(["--latents", str(random_job), "--keys", "clip-000001,nope"], "unknown key 'nope'")
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, other)
    fails(["--latents", str(random_job), "--checkpoint", str(other)], "is not the checkpoint these latents were")
    job_file = random_job / "job.json"
    original = job_file.read_text()
    changed = json.loads(original)
    changed["settings"]["vae"]["params"]["ch"] = 48
    job_file.write_text(json.dumps(changed))
    try:
        fails(["--latents", str(random_job)], "VAE preset 'flux-ae-tiny' is not the one the job used (changed: params)")
    finally:
        job_file.write_text(original)
    shard = Path(read_metadata(random_job).to_pylist()[-1]["source"])
    shard.rename(shard.with_suffix(".moved"))
    try:
        fails(["--latents", str(random_job), "--limit", "0"], f"source shard {shard} is missing")
    finally:
        shard.with_suffix(".moved").rename(shard)


@pytest.mark.slow
def test_demo_checkpoint_reconstructs_held_out_videos(ray_cluster, tmp_path, capsys):
    """`make demo` end to end on videos never trained on (demo seed 0; training used seed 1)."""
    data = tmp_path / "data"
    write_demo_dataset(data, shards=2, samples_per_shard=3, seed=0)
    latents, out = tmp_path / "latents", tmp_path / "reconstructions"
    config = ["--config", str(REPO / "configs" / "demo.yaml"), "--checkpoint", str(DEMO_CHECKPOINT)]
    inputs = ["--input", str(data / "shard-{000000..000001}.tar"), "--output", str(latents)]
    assert precompute.main([*config, *inputs]) == 0
    assert reconstruct.main(["--latents", str(latents), "--output", str(out), "--limit", "0"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["samples"]) == 6 and report["weights"].startswith(str(DEMO_CHECKPOINT))
    assert report["mean"]["psnr"] >= 26.0, report["mean"]
    assert report["mean"]["ssim"] >= 0.85, report["mean"]
    assert (out / "report.md").is_file()
    for sample in report["samples"]:
        assert (out / sample["video"]).suffix == ".mp4" and (out / sample["video"]).stat().st_size > 0
        assert read_image(out / sample["preview"]).shape == (2 * 128 + 2, 8 * 128 + 7 * 2, 3)
    print(capsys.readouterr().out)


def test_a_source_in_the_metadata_never_runs_a_command(random_job, tmp_path, capsys):
    """A Parquet row whose `source` is `pipe:...`: refused unless the user passes --allow-shell."""
    copy = tmp_path / "latents"
    shutil.copytree(random_job, copy)
    ran = tmp_path / "ran"
    meta = sorted((copy / "meta").glob("*.parquet"))[0]
    table = pq.read_table(meta)
    real = table.column("source")[0].as_py()
    hostile = pa.array([f"pipe:touch {ran}; cat {real}"] * table.num_rows)
    pq.write_table(table.set_column(table.schema.get_field_index("source"), "source", hostile), meta)
    marker_path = copy / "_commits" / f"{meta.stem}.json"  # committed so (rows of no marker are not read)
    marker = json.loads(marker_path.read_text())
    marker["meta"].update(bytes=meta.stat().st_size, sha256=hashlib.sha256(meta.read_bytes()).hexdigest())
    marker_path.write_text(json.dumps(marker))
    args = ["--latents", str(copy), "--output", str(tmp_path / "out"), "--keys", "clip-000000"]
    assert reconstruct.main(args) == 2
    err = capsys.readouterr().err
    assert "is a shell command (pipe:)" in err and "--allow-shell" in err
    assert not ran.exists()
    assert reconstruct.main([*args, "--allow-shell"]) == 0  # the user's own choice
    assert ran.exists()


def test_a_long_key_gets_a_bounded_traceable_file_name(tmp_path):
    key = "dir/" + "k" * 300
    write_shard(tmp_path / "data" / "s.tar", [(key, demo_sample(0, 0)), ("short", demo_sample(0, 1))])
    config = JobConfig(
        input=[str(tmp_path / "data" / "s.tar")],
        output=str(tmp_path / "latents"),
        vae=VAEConfig(name="flux-ae-tiny"),
        video=VideoConfig(num_frames=2, height=32, width=32),
        run=RunConfig(batch_size=2, decode_threads=1),
    )
    encode_in_process(config)
    out = tmp_path / "report"
    assert reconstruct.main(["--latents", str(tmp_path / "latents"), "--output", str(out), "--limit", "0"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["key"] for s in report["samples"]] == [key, "short"]
    video = Path(report["samples"][0]["video"]).name
    assert len(video.encode()) < 140 and video.startswith("dir__kkk") and "~" in video
    assert (out / report["samples"][0]["video"]).is_file() and (out / report["samples"][0]["preview"]).is_file()
