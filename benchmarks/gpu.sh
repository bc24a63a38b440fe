#!/usr/bin/env bash
# The GPU figures of the README, on one machine with an NVIDIA GPU:
#   bash benchmarks/gpu.sh                 # every part; PEAK_TFLOPS=989 (H100/H200 SXM, bf16 dense) unless set
#   bash benchmarks/gpu.sh encoder         # one part: check, encoder, throughput or memory (each well
#                                          # under 10 minutes, for machines lent a command at a time)
# Random weights (no checkpoint needed: the speed is the same); the full presets in bf16.
# Each step rewrites its GPU table in README.md (the command that made it is in the table; the CPU
# tables stay).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PEAK=${PEAK_TFLOPS:-989}
PART=${1:-all}
case "$PART" in all | check | encoder | throughput | memory) ;;
*) echo "usage: $0 [all|check|encoder|throughput|memory]" >&2; exit 2 ;; esac
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [[ $PART == all || $PART == check ]]; then
    # correctness first: the GPU-only tests, and the encoder's CPU tests, whose encoders run on the GPU here
    # (page-locked and asynchronous copies, write-behind, read-ahead, uint8 frames; about a minute)
    $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_write_behind.py tests/test_read_ahead.py \
        tests/test_host_frames.py tests/test_posterior.py
fi
if [[ $PART == all || $PART == encoder ]]; then
    # encoder alone: MFU, peak memory, each technique on and off, diffusers' AutoencoderKLHunyuanVideo beside it
    $PY benchmarks/encoder.py --device cuda --presets hunyuan-vae --sizes 256x256 1280x720 --frames 33 129 \
        --compile --peak-tflops "$PEAK" --readme README.md --block encoder-gpu
    $PY benchmarks/encoder.py --device cuda --presets flux-ae dc-ae-f32t4c128 --sizes 256x256 1280x720 --frames 33 \
        --peak-tflops "$PEAK" --readme README.md --block encoder-gpu-others
fi
if [[ $PART == all || $PART == throughput ]]; then
    # decode/encode/job/baselines at 256x256 and at 1280x720, 33 frames (1 + 4k), from sources of about
    # 720p (576x960 to 1152x672: the decoding a real dataset costs)
    # (the job again with pinned memory, write-behind, batching, parallel decoding, read-ahead across its 4
    # shards and freed host memory kept for reuse each off; at 1280x720 through FFmpeg's scaler, so that the
    # frames travel as uint8, and again as float32)
    $PY benchmarks/throughput.py --device cuda --preset hunyuan-vae --frames 33 --size 256 --clips 64 \
        --source-scale 6 --per-shard 16 --batch 4 --workers 1 --cpus-per-worker 8 --decode-processes 8 \
        --peak-tflops "$PEAK" --techniques pageable no-write-behind batch-1 one-process no-read-ahead \
        default-malloc --readme README.md --block throughput-gpu
    $PY benchmarks/throughput.py --device cuda --preset hunyuan-vae --frames 33 --size 1280x720 --clips 16 \
        --source-scale 6 --batch 1 --workers 1 --cpus-per-worker 8 --decode-processes 8 --peak-tflops "$PEAK" \
        --resize decoder --techniques float-frames pageable --readme README.md --block throughput-gpu-720p
fi
if [[ $PART == all || $PART == memory ]]; then
    # loading a float32 checkpoint in bf16: per tensor (the job's), the whole file then converted, host copy first
    $PY benchmarks/load_memory.py --device cuda
    # memory and accuracy of tiled and chunked encodes, per plan (129 frames at 720p: the exact-chunks rows above)
    $PY benchmarks/vae_memory.py --device cuda
fi
