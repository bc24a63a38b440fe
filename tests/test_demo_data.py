"""The generated demo videos (`jobs.demo_data`): their lengths stay within what was asked for."""

from __future__ import annotations

import pytest

from jobs.demo_data import write_demo_dataset
from jobs.inputs.tar_samples import read_shard, split_sample
from jobs.inputs.video import VideoFile


def test_videos_are_as_long_as_asked_for_so_that_long_clips_can_be_cut_from_each(tmp_path):
    (shard,) = write_demo_dataset(tmp_path, shards=1, samples_per_shard=6, min_frames=50, max_frames=56)
    lengths = []
    for raw in read_shard(str(shard), lambda reason: None):
        video = split_sample(raw, ["mp4"]).video
        assert video is not None
        lengths.append(VideoFile(video).info.num_frames)
    assert len(lengths) == 6 and all(50 <= n <= 56 for n in lengths), lengths
    with pytest.raises(ValueError, match="min_frames"):
        write_demo_dataset(tmp_path / "none", shards=1, min_frames=60)
