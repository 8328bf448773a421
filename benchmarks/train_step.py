"""Speed and memory of one DeCLIP distillation step on the CPU (DeCLIP, CVPR 2025; docs/method.md §3-5).

The real recipe's shapes with random weights built from configs (nothing is downloaded): a ViT-B/16 student at
560 px, 20 teacher crops of 224 px per image, a DINOv2-B VFM at 490 px, batch 2; the teacher rows swap in SAM-B
(its encoder and neck at 560 px, docs/method.md §9) or DINO-B/16 (560 px). Each variant runs in its own process, so
the peak resident memory (ru_maxrss) is that variant's own. The step is the training script's: VFM features and
teacher crop embeddings without grad, the student's dense features, both losses, backward, AdamW. Reported:
seconds per step, images/s, peak RSS, the time split into VFM, teacher crops and the student's forward+backward
(with the loss and optimizer update), and the VFM part's own peak: how far its forward raised the RSS above the
built models (it runs first in the step, so nothing else has raised it yet).

The machine's fp32 and bf16 matrix-multiply rates are measured before and after the variants (their ratio R is
what bf16 can gain at best), and every variant's images/s is given as a ratio to the first variant's, all in one run.

    python benchmarks/train_step.py               # all variants, a markdown table (about 10 minutes on 2 cores)
    python benchmarks/train_step.py --tiny        # the same on tiny models, seconds: checks the script itself
    python benchmarks/train_step.py --device cuda --batch_size 4 --variants "bf16 autocast + bf16 teachers" --compile
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModel, Dinov2Config, SamVisionConfig, ViTConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `training.*` from the repository root

from declip_hf import DeCLIPVisionConfig  # noqa: E402  (registers DeCLIP with AutoModel)
from training.distill import DenseStudent  # noqa: E402
from training.losses import DeCLIPLoss  # noqa: E402
from training.optim import build_optimizer, configure_trainable  # noqa: E402
from training.teachers import FrozenCLIPTeacher, FrozenVFM  # noqa: E402

# (student config, DINOv2 config, student size, teacher size, DINOv2 view size, crops per image)
SHAPES = {
    "vitb16": (
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16,
             image_size=224, projection_dim=512, hidden_act="quick_gelu"),
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14, image_size=518, mlp_ratio=4),
        560, 224, 490, 20,
    ),
    "tiny": (
        dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=4,
             image_size=32, projection_dim=24),
        dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=2, image_size=32, mlp_ratio=2),
        64, 32, 32, 20,
    ),
}


# Context teachers other than the shapes' DINOv2: config class and kwargs per shape name. The view is the student's
# grid at the teacher's patch size (560 px for patch 16 at a 560 px student).
OTHER_TEACHERS = {
    "sam_b": (SamVisionConfig, {
        "vitb16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=16, image_size=1024,
                       window_size=14, global_attn_indexes=[2, 5, 8, 11], output_channels=256),
        "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=4, image_size=32,
                     window_size=4, global_attn_indexes=[1], output_channels=24, mlp_dim=37),
    }),
    "dino_b16": (ViTConfig, {
        "vitb16": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       patch_size=16, image_size=224),
        "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, patch_size=2,
                     image_size=32),
    }),
}


@dataclass
class Variant:
    name: str
    attention: str = "sdpa"  # "sdpa" (fused) or "eager" (explicit softmax(QK^T)V everywhere)
    checkpointing: bool = False
    autocast_bf16: bool = False  # the student under bf16 autocast (the teachers follow --frozen_dtype)
    frozen_dtype: str = "float32"
    teacher: str = "dinov2"  # the context teacher: "dinov2" (the shapes' own) or a key of OTHER_TEACHERS


VARIANTS = [
    Variant("fp32"),
    Variant("fp32 + checkpointing", checkpointing=True),
    Variant("fp32 eager", attention="eager"),
    Variant("fp32 eager + checkpointing", attention="eager", checkpointing=True),
    Variant("fp32, bf16 teachers + checkpointing", checkpointing=True, frozen_dtype="bfloat16"),
    Variant("bf16 autocast + bf16 teachers + checkpointing", checkpointing=True, autocast_bf16=True,
            frozen_dtype="bfloat16"),
    Variant("bf16 autocast + bf16 teachers", autocast_bf16=True, frozen_dtype="bfloat16"),
    Variant("fp32, SAM-B teacher", teacher="sam_b"),
    Variant("fp32, DINO-B/16 teacher", teacher="dino_b16"),
]


def build_vfm(variant: Variant, shape_name: str, dtype: torch.dtype) -> FrozenVFM:
    """The variant's context teacher, random weights from its config, read by its adapter (training/teachers/)."""
    if variant.teacher == "dinov2":
        config = Dinov2Config(**SHAPES[shape_name][1])
    else:
        config_class, kwargs = OTHER_TEACHERS[variant.teacher]
        config = config_class(**kwargs[shape_name])
    return FrozenVFM(AutoModel.from_config(config, attn_implementation=variant.attention), dtype)


def build(variant: Variant, shape_name: str, device: str = "cpu", compile_models: bool = False):
    student_kwargs = SHAPES[shape_name][0]
    config = DeCLIPVisionConfig(**student_kwargs, decoupled_attention="qq")
    # With attn_implementation="eager" the decoupled last layer materialises its attention weights too.
    student = AutoModel.from_config(config, attn_implementation=variant.attention)
    configure_trainable(student)
    if variant.checkpointing:
        student.activation_checkpointing_enable()
    student.train().to(device)
    teacher_model = AutoModel.from_config(config, attn_implementation=variant.attention)
    teacher_model.load_state_dict(student.state_dict())  # the starting CLIP
    dtype = getattr(torch, variant.frozen_dtype)
    teacher = FrozenCLIPTeacher(teacher_model, dtype).to(device)
    vfm = build_vfm(variant, shape_name, dtype).to(device)
    optimizer = build_optimizer(student, 1e-5, 0.1, (0.9, 0.98), 1e-6)
    models = (DenseStudent(student), teacher, vfm)
    if compile_models:  # compiled on the warm-up step, which is not timed
        models = tuple(torch.compile(model) for model in models)
    return *models, optimizer


def make_batch(shapes, batch_size: int, vfm_patch: int) -> dict[str, torch.Tensor]:
    """Random views with every crop slot used (the most teacher work a step can have); the VFM view is the
    student's grid at `vfm_patch`."""
    student_size, teacher_size, _, crops = shapes[2:]
    student_patch = shapes[0]["patch_size"]
    vfm_size = student_size // student_patch * vfm_patch
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


def timed_step(batch, student, teacher, vfm, optimizer, loss_fn, autocast, device: str = "cpu") -> dict[str, float]:
    """training/distill.py's `training_step` + backward + update, with a clock around each part. The VFM runs
    first, so the peak RSS right after it is the models' plus the VFM forward's own."""
    times = {}
    start = clock(device)
    with autocast():
        vfm_map = vfm(batch["vfm"])
    times["vfm_s"] = clock(device) - start
    times["vfm_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = clock(device)
    with autocast():
        teacher_embeds = teacher(batch["crops"][batch["crop_valid"]])
    times["teacher_s"] = clock(device) - start
    start = clock(device)
    with autocast():
        dense = student(batch["student"])
    terms = loss_fn(dense.dense_embeds, dense.context_features, batch["boxes"], batch["crop_valid"], teacher_embeds,
                    vfm_map)
    terms["total"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    times["student_s"] = clock(device) - start
    times["step_s"] = times["vfm_s"] + times["teacher_s"] + times["student_s"]
    return times


def run_variant(variant: Variant, shape_name: str, steps: int, batch_size: int, device: str = "cpu",
                compile_models: bool = False) -> dict:
    shapes = SHAPES[shape_name]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    student, teacher, vfm, optimizer = build(variant, shape_name, device, compile_models)
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    batch = {key: value.to(device) for key, value in make_batch(shapes, batch_size, vfm.patch_size).items()}
    loss_fn = DeCLIPLoss()
    if variant.autocast_bf16:
        autocast = lambda: torch.autocast(device, dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = nullcontext
    # warm-up: allocator, kernels, Adam state, compilation; its VFM part is the first to raise the RSS above the
    # built models
    warm_up = timed_step(batch, student, teacher, vfm, optimizer, loss_fn, autocast, device)
    measured = [timed_step(batch, student, teacher, vfm, optimizer, loss_fn, autocast, device) for _ in range(steps)]
    mean = {key: sum(step[key] for step in measured) / steps for key in measured[0]}
    return {
        **asdict(variant),
        **mean,
        "device": device,
        "compiled": compile_models,
        "batch_size": batch_size,
        "vfm_view": batch["vfm"].shape[-1],
        "vfm_forward_peak_gib": warm_up["vfm_peak_rss_gib"] - rss_built,
        "vfm_weights_gib": sum(p.numel() * p.element_size() for p in vfm.parameters()) / 2**30,
        "images_per_s": batch_size / mean["step_s"],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB -> GiB
        # On CUDA the memory that matters is the GPU's: the peak of torch.cuda.max_memory_allocated.
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "rss_after_imports_gib": rss_before,
        "threads": torch.get_num_threads(),
    }


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


def table(results: list[dict]) -> str:
    """One row per variant; "ratio" is its images/s over the first row's (same run, same machine)."""
    reference = {result["attention"] + str(result["checkpointing"]): result["step_s"] for result in results
                 if result["attention"] == "sdpa" and not result["autocast_bf16"]
                 and result["frozen_dtype"] == "float32" and result["teacher"] == "dinov2"}
    first = results[0]["images_per_s"]
    lines = [
        "| variant | s/step | images/s | ratio | peak GiB | teacher crops s | VFM s | VFM view px | VFM weights GiB | "
        "VFM forward peak GiB | student fwd+bwd s | eager/fused time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        fused = reference.get("sdpa" + str(r["checkpointing"]))
        ratio = f"{r['step_s'] / fused:.2f}x" if r["attention"] == "eager" and fused else ""
        peak = r["peak_cuda_gib"] if r.get("peak_cuda_gib") is not None else r["peak_rss_gib"]
        lines.append(f"| {r['name']} | {r['step_s']:.2f} | {r['images_per_s']:.3f} | {r['images_per_s'] / first:.2f} | "
                     f"{peak:.2f} | {r['teacher_s']:.2f} | {r['vfm_s']:.2f} | {r['vfm_view']} | "
                     f"{r['vfm_weights_gib']:.2f} | {r['vfm_forward_peak_gib']:.2f} | {r['student_s']:.2f} | {ratio} |")
    return "\n".join(lines)


def rates_line(label: str, rates: dict) -> str:
    return (f"{label}: fp32 matmul {rates['fp32_gflops']:.0f} GFLOP/s, bf16 {rates['bf16_gflops']:.0f} GFLOP/s, "
            f"R = {rates['R']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Tiny models instead of ViT-B/16 + DINOv2-B (a smoke test).")
    parser.add_argument("--steps", type=int, default=2, help="Measured steps per variant (after one warm-up step).")
    parser.add_argument("--batch_size", type=int, default=2, help="Images per step.")
    parser.add_argument("--variants", nargs="*", help="Run only these variant names (default: all).")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="Where the step runs.")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student, teacher and VFM.")
    parser.add_argument("--matmul_seconds", type=float, default=2.0, help="Seconds per matmul-rate measurement.")
    parser.add_argument("--json", help="Also write the results (and the matmul rates) to this JSON file.")
    parser.add_argument("--timeout", type=float, default=1800, help="Give up on a variant after this many seconds.")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()
    shape_name = "tiny" if args.tiny else "vitb16"
    if args.child:
        variant = next(v for v in VARIANTS if v.name == args.child)
        print(json.dumps(run_variant(variant, shape_name, args.steps, args.batch_size, args.device, args.compile)))
        return
    unknown = set(args.variants or ()) - {variant.name for variant in VARIANTS}
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {[variant.name for variant in VARIANTS]}")
    results, rates_before = [], matmul_rates(args.device, args.matmul_seconds)
    print(rates_line("before", rates_before), flush=True)
    for variant in VARIANTS:
        if args.variants and variant.name not in args.variants:
            continue
        command = [sys.executable, __file__, "--child", variant.name, "--steps", str(args.steps),
                   "--batch_size", str(args.batch_size), "--device", args.device]
        command += (["--tiny"] if args.tiny else []) + (["--compile"] if args.compile else [])
        try:
            output = subprocess.run(command, check=True, capture_output=True, text=True, timeout=args.timeout).stdout
        except subprocess.TimeoutExpired:
            print(f"{variant.name}: did not finish within {args.timeout} s", flush=True)
            continue
        results.append(json.loads(output.strip().splitlines()[-1]))
        print(f"{variant.name}: {json.dumps(results[-1])}", flush=True)
    rates_after = matmul_rates(args.device, args.matmul_seconds)
    print(f"\nbatch {args.batch_size}, {shape_name}, {args.device}{' compiled' if args.compile else ''}, "
          f"{results[0]['threads']} threads, mean of {args.steps} steps; peak GiB is "
          f"{'torch.cuda.max_memory_allocated' if args.device == 'cuda' else 'the peak RSS'}")
    print(rates_line("matmul rates before", rates_before))
    print(rates_line("matmul rates after ", rates_after) + "\n")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_before": rates_before, "matmul_after": rates_after,
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
