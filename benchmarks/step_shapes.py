"""What one DeCLIP distillation step is fed in the step benchmarks, with nothing but torch: the recipe's shapes, the
random batch, a device-aware clock and the machine's matrix-multiply rates. Shared by `train_step.py` (this
project's step) and `authors_step.py` (the authors' step), which must not import each other: the authors' code
has a top-level `training` package of its own."""

import resource
import time
from typing import NamedTuple

import torch


class StepShape(NamedTuple):
    """One step's models and views: the student's and DINOv2's config kwargs, the student's and the teacher crops'
    sides, and the crops per image (the DINOv2 view is the student's grid at DINOv2's patch size)."""

    student: dict
    vfm: dict
    student_size: int
    teacher_size: int
    crops: int


SHAPES = {
    "vitb16": StepShape(
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16,
             image_size=224, projection_dim=512, hidden_act="quick_gelu"),
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14, image_size=518, mlp_ratio=4),
        student_size=560, teacher_size=224, crops=20,
    ),
    "tiny": StepShape(
        dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=4,
             image_size=32, projection_dim=24),
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=2, image_size=32, mlp_ratio=2),
        student_size=64, teacher_size=32, crops=20,
    ),
}


def make_batch(shape: StepShape, batch_size: int, vfm_patch: int) -> dict[str, torch.Tensor]:
    """Random views with every crop slot used (the most teacher work a step can have); the VFM view is the
    student's grid at `vfm_patch`."""
    student_size, teacher_size, crops = shape.student_size, shape.teacher_size, shape.crops
    vfm_size = student_size // shape.student["patch_size"] * vfm_patch
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(batch_size, crops, 2, 2, generator=generator)
    boxes = torch.cat([corners.min(dim=2).values, corners.max(dim=2).values + 0.05], dim=-1).clamp(max=1.0)
    return {
        "student": torch.randn(batch_size, 3, student_size, student_size, generator=generator),
        "crops": torch.randn(batch_size, crops, 3, teacher_size, teacher_size, generator=generator),
        "boxes": boxes,
        "crop_valid": torch.ones(batch_size, crops, dtype=torch.bool),
        "vfm": torch.randn(batch_size, 3, vfm_size, vfm_size, generator=generator),
    }


def clock(device: str) -> float:
    """Seconds now, after the device has finished its queued work (CUDA runs asynchronously)."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def matmul_gflops(dtype: torch.dtype = torch.float32, device: str = "cpu", seconds: float = 2.0) -> float:
    """The machine's matrix-multiply rate in `dtype` right now (the MLP shape of the student), to read the step
    times against: on a shared machine it moves with the load. bf16 over fp32 (R) is the most bf16 can gain."""
    inputs = torch.randn(2452, 768, device=device, dtype=dtype)
    weight = torch.randn(3072, 768, device=device, dtype=dtype)
    inputs @ weight.T
    count, start = 0, clock(device)
    while clock(device) - start < seconds:
        for _ in range(10 if device == "cuda" else 1):  # a GPU needs several queued products to keep busy
            inputs @ weight.T
            count += 1
    return 2 * 2452 * 768 * 3072 * count / (clock(device) - start) / 1e9


def matmul_rates(device: str, seconds: float = 2.0) -> dict[str, float]:
    fp32, bf16 = matmul_gflops(torch.float32, device, seconds), matmul_gflops(torch.bfloat16, device, seconds)
    return {"fp32_gflops": fp32, "bf16_gflops": bf16, "R": bf16 / fp32}


# Where a step's CPU time goes, by kind of operator (the profiler's evidence for what a faster step could still gain).
OPERATOR_KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
               "aten::convolution_backward"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                  "aten::_scaled_dot_product_efficient_attention", "aten::_efficient_attention_forward",
                  "aten::_efficient_attention_backward", "aten::_scaled_dot_product_flash_attention",
                  "aten::_flash_attention_forward", "aten::_flash_attention_backward"),
}


def profile_shares(step) -> dict[str, float]:
    """Run `step()` once under torch.profiler; the share of self CPU time in matrix multiplies (GEMMs and the patch
    convolution), fused attention kernels, and everything else (element-wise ops, norms, softmax, copies, the
    optimizer), plus the total seconds."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    totals = {kind: 0.0 for kind in (*OPERATOR_KINDS, "other")}
    for event in profiler.key_averages():
        kind = next((kind for kind, names in OPERATOR_KINDS.items() if event.key in names), "other")
        totals[kind] += event.self_cpu_time_total
    total = sum(totals.values())
    return {**{kind: seconds / total for kind, seconds in totals.items()}, "profiled_s": total / 1e6}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def measure_steps(step, steps: int, batch_size: int, device: str, profile: bool = False) -> dict:
    """`step()` (returning its parts' seconds) once to warm up (allocator, kernels, optimizer state, compilation),
    then `steps` times: the mean of each part, images/s, the peaks (RSS, and on CUDA the steps' own
    max_memory_allocated), and with `profile` the operator shares of one more step, run after the peaks are read
    (the profiler's records take memory of their own)."""
    step()
    if device == "cuda":  # the steps' own peak, without compilation's (the RSS, a high-water mark, keeps it)
        torch.cuda.reset_peak_memory_stats()
    measured = [step() for _ in range(steps)]
    mean = {key: sum(times[key] for times in measured) / steps for key in measured[0]}
    peaks = {"peak_rss_gib": peak_rss_gib(),
             # On CUDA the memory that matters is the GPU's: the peak of torch.cuda.max_memory_allocated.
             "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
    return {**mean, "images_per_s": batch_size / mean["step_s"], **peaks,
            "profile": profile_shares(step) if profile else {}, "batch_size": batch_size,
            "threads": torch.get_num_threads()}
