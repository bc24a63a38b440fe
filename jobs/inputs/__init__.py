"""The input side: where samples come from, and how a video becomes a clip. No Ray here.

shards.py       SPEC listing behind a small storage interface (local files; URLs webdataset opens)
tar_samples.py  samples out of an input tar, as webdataset stages with an explicit error policy
video.py        PyAV decoding and Open-Sora's resize/crop of a clip
"""
