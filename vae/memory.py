"""How much memory an encode or decode allocates: a shape-only estimate and a real measurement.

The estimate runs the very code that would run for real, on the meta device (shapes only: no
data, no arithmetic), and counts the bytes of the tensors alive at each moment; its peak is the
activation memory of the call, derived from the architecture and the tiling plan together
(widths, resolutions, which tensors each block keeps while the next is computed, conv caches,
attention keys and values, blended tiles). Two things the trace cannot see are added by
calibration factors measured on real runs: kernel workspaces and layout copies (oneDNN reorders
activations into blocked layouts on CPU; cuDNN takes workspace on CUDA), and allocator rounding.

Fused attention (FlashAttention on CUDA, the flash kernel on CPU) never holds the score matrix,
but on the meta device `scaled_dot_product_attention` falls back to the math path that would;
the trace models it as allocating its output only.

Convolutions on CPU are modelled too, because there the workspace can dwarf the activations:
for small float32 inputs (batch 1, N*C*D*H <= 20480, no groups, kernels up to 3) PyTorch
prefers its native kernel, which unfolds the input into a C_in*k^3 x (output positions) buffer
(`slow_conv3d`: 27x the input for a 3x3x3 conv); otherwise oneDNN reorders input and output
into its blocked layout. See `_cpu_conv_workspace` for what was measured.

Measurement (`measure_peak_bytes`) uses `torch.cuda.max_memory_allocated` on CUDA and, on CPU,
the allocation events of `torch.profiler` (every allocation and free of the CPU allocator, in
order), whose running sum peaks where the process's tensor memory did.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter

T = TypeVar("T")

# Measured peak / traced peak, by device type. CPU: 0.76-1.02 over the tiny presets of all three
# families, encode and decode, untiled, chunked and tiled (the table of benchmarks/vae_memory.py;
# the rest is allocator and kernel detail). CUDA: not measured yet (no GPU where this was
# written): cuDNN's workspace and the caching allocator's rounding are left to a wide margin
# until `benchmarks/vae_memory.py` is run on a GPU.
CALIBRATION = {"cpu": 1.2, "cuda": 1.5}


_CONV_COMPOSITES = (torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default)


def _cpu_conv_workspace(func: Any, args: Any) -> int:
    """Scratch bytes a CPU convolution allocates while it runs (PyTorch's kernel choice, ConvUtils.h).

    Measured on torch 2.13: the native kernel unfolds its input (C_in/groups * k^3 rows, one
    column per output position; exact); oneDNN reorders input and output into its blocked
    layout for k > 1 (exact at stride 1, about twice too much at stride 2) and needs nothing
    for 1x1x1 kernels.
    """
    if func is torch.ops.aten.convolution.default:
        x, weight = args[0], args[1]
        stride, padding, groups = args[3], args[4], args[8]
    elif func in _CONV_COMPOSITES:  # inference tensors dispatch conv3d(x, w, b, stride, padding, dilation, groups)
        x, weight = args[0], args[1]
        stride, padding, groups = (args[i] if len(args) > i else default for i, default in ((3, 1), (4, 0), (6, 1)))
    else:
        return 0
    kernel = weight.shape[2:]
    stride = [stride] * len(kernel) if isinstance(stride, int) else stride
    padding = [padding] * len(kernel) if isinstance(padding, int) else padding
    out_shape = [(n + 2 * p - k) // s + 1 for n, k, s, p in zip(x.shape[2:], kernel, stride, padding)]
    reorders = 0 if math.prod(kernel) == 1 else (x.numel() + x.shape[0] * weight.shape[0] * math.prod(out_shape))
    if x.dtype != torch.float32:  # bf16/half always go to oneDNN
        return reorders * x.element_size()
    n = x.shape[0]
    strided = any(s != 1 for s in stride)
    onednn = (strided or n >= 16 or kernel[-1] != 1 or kernel[-2] != 1 or torch.get_num_threads() > 1) and (
        groups > 1 or (kernel[-1] > 3 and kernel[-2] > 3) or n > 1 or math.prod(x.shape[:4]) > 20480
    )
    if onednn:
        return reorders * x.element_size()
    # Native kernel: one item at a time, its input unfolded to (C_in/groups * k...) x output positions.
    return x.shape[1] // groups * math.prod(kernel) * math.prod(out_shape) * x.element_size()


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created inside the mode while they are alive.

    Args:
        workspace: Scratch bytes an op holds while it runs, beside its inputs and outputs.
    """

    def __init__(self, workspace: Callable[[Any, Any], int] | None = None) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self.workspace = workspace
        self._counted: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._counted.discard(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        # Outputs that share a storage with an input (views, in-place and out= ops) allocate nothing.
        inputs = {id(t.untyped_storage()) for t in tree_iter((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_iter(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._counted:
                continue
            nbytes = storage.nbytes()
            self._counted.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key, nbytes)
        if self.workspace is not None:
            self.peak = max(self.peak, self.live + self.workspace(func, args))
        return out


class _FusedAttention(TorchFunctionMode):
    """Replaces attention by an empty output of the right shape (what a fused kernel allocates)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is F.scaled_dot_product_attention:
            q, _, v = args[:3]
            return q.new_empty((*q.shape[:-1], v.shape[-1]))
        return func(*args, **(kwargs or {}))


def traced_peak_bytes(fn: Callable[[], Any], device: str = "cuda") -> int:
    """Peak bytes of the tensors that `fn` allocates, counted while it runs (meant for the meta device).

    Tensors that exist before the call (weights, the input) are not counted; what `fn` returns
    is, since it is allocated during the call. `device` is where the real run would happen:
    "cpu" adds the convolution scratch buffers of PyTorch's CPU kernels.

    Runs with inference mode off (gradients still off): under inference mode composite ops such
    as `conv3d` and `group_norm` reach the tracer whole, hiding their temporaries and the kernel
    choice; outside it they arrive decomposed, the same kernels either way.
    """
    workspace = _cpu_conv_workspace if device == "cpu" else None
    with torch.inference_mode(False), torch.no_grad(), _FusedAttention(), _LiveBytes(workspace) as live:
        fn()
    return live.peak


def measure_peak_bytes(fn: Callable[[], T], device: torch.device | str) -> tuple[T, int]:
    """Runs `fn` and returns its result and the peak bytes it allocated above what was allocated before.

    Args:
        fn: The work to measure.
        device: Where its tensors live: CUDA uses the caching allocator's statistics; CPU records
            allocator events with `torch.profiler` (slower; for tests and benchmarks).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - base
    if device.type != "cpu":
        raise ValueError(f"cannot measure memory on {device}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return result, peak


def calibrated(traced: int, device: torch.device | str) -> int:
    """A traced peak scaled by the device's calibration factor (see `CALIBRATION`)."""
    return math.ceil(traced * CALIBRATION.get(torch.device(device).type, CALIBRATION["cuda"]))


def available_bytes(device: torch.device | str, fraction: float = 0.9) -> float:
    """A default budget: `fraction` of what this process could still allocate on a CUDA device
    (free memory plus its allocator's unused reserve), rounded down to 256 MiB so that plans
    cached by budget are reused from batch to batch. Unbounded elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return math.inf
    free, _ = torch.cuda.mem_get_info(device)
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    step = 256 * 2**20
    return float(int((free + unused) * fraction) // step * step)
