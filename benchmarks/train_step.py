"""Speed and memory of one DeCLIP distillation step (DeCLIP, CVPR 2025; docs/method.md §3-5), against the authors'.

The real recipe's shapes with random weights built from configs (nothing is downloaded): a ViT-B/16 student at
560 px, 20 teacher crops of 224 px per image, a DINOv2-B VFM at 490 px, batch 2; other rows swap in SAM-B (its
encoder and neck at 560 px, docs/method.md §9) or DINO-B/16 (560 px). The step is the training script's: VFM
features and teacher crop embeddings without grad, the student's dense features, both losses, backward, AdamW, with
the flags each row names (`--gradient_checkpointing`, `--mixed_precision bf16 --frozen_dtype bfloat16`,
`--compile`). With `--authors_src`, the first row is the authors' own step on the same shapes (authors_step.py).

Each row runs in its own process, so its peak resident memory (ru_maxrss) is its own. Every row is measured once per
round and the rounds follow each other, so a slow spell of a shared machine hits all rows alike; the table gives the
median over rounds and the range, and each row's ratios to the first row's images/s and peak memory are taken within
a round. The machine's fp32 and bf16 matrix-multiply rates are printed before and after each round: their ratio R
is what bf16 can gain at best. Also reported: the time split into VFM, teacher crops and the student's
forward+backward (with the loss and optimizer update), and the VFM forward's own peak above the built models.

    python benchmarks/train_step.py --authors_src ~/DeCLIP/src     # the main rows and the authors' (~40 min, 2 cores)
    python benchmarks/train_step.py --tiny --rounds 1              # tiny models, seconds: checks the script itself
    python benchmarks/train_step.py --all                          # also eager attention and the other teachers
    python benchmarks/train_step.py --device cuda --batch_size 4 --variants "bf16 autocast + bf16 teachers" --compile
"""

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from transformers import AutoModel, Dinov2Config, SamVisionConfig, ViTConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `training.*` from the repository root

from declip_hf import DeCLIPVisionConfig  # noqa: E402  (registers DeCLIP with AutoModel)
from step_shapes import SHAPES, clock, make_batch, matmul_rates, measure_steps, peak_rss_gib  # noqa: E402
from training.distill import DenseStudent, compile_in_place, training_step  # noqa: E402
from training.losses import DeCLIPLoss  # noqa: E402
from training.optim import build_optimizer, configure_trainable  # noqa: E402
from training.teachers import ContextTeachers, FrozenCLIPTeacher, FrozenVFM  # noqa: E402

AUTHORS_STEP = Path(__file__).with_name("authors_step.py")
AUTHORS_ROW = "authors' code, fp32"


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
    # "sdpa" (fused) or "eager" (explicit softmax(QK^T)V in the student and the VFM; the content teacher's CLS-only
    # last layer is always fused)
    attention: str = "sdpa"
    checkpointing: bool = False
    autocast_bf16: bool = False  # the student under bf16 autocast (the teachers follow --frozen_dtype)
    frozen_dtype: str = "float32"
    teacher: str = "dinov2"  # the context teacher: "dinov2" (the shapes' own) or a key of OTHER_TEACHERS
    compiled: bool = False  # distill.py --compile (inductor): compiled on the warm-up step, which is not timed
    default: bool = True  # in the run without --variants / --all


BF16 = dict(autocast_bf16=True, frozen_dtype="bfloat16")  # distill.py --mixed_precision bf16 --frozen_dtype bfloat16
VARIANTS = [
    Variant("fp32"),
    Variant("fp32 + checkpointing", checkpointing=True),
    Variant("fp32, compiled", compiled=True),
    Variant("bf16 autocast + bf16 teachers", **BF16),
    Variant("bf16 autocast + bf16 teachers + checkpointing", checkpointing=True, **BF16),
    Variant("bf16 autocast + bf16 teachers, compiled", compiled=True, **BF16),
    Variant("fp32 eager", attention="eager", default=False),
    Variant("fp32 eager + checkpointing", attention="eager", checkpointing=True, default=False),
    Variant("fp32, bf16 teachers + checkpointing", checkpointing=True, frozen_dtype="bfloat16", default=False),
    Variant("fp32, SAM-B teacher", teacher="sam_b", default=False),
    Variant("fp32, DINO-B/16 teacher", teacher="dino_b16", default=False),
]


def build_vfm(variant: Variant, shape_name: str, dtype: torch.dtype) -> FrozenVFM:
    """The variant's context teacher, random weights from its config, read by its adapter (training/teachers/)."""
    if variant.teacher == "dinov2":
        config = Dinov2Config(**SHAPES[shape_name].vfm)
    else:
        config_class, kwargs = OTHER_TEACHERS[variant.teacher]
        config = config_class(**kwargs[shape_name])
    return FrozenVFM(AutoModel.from_config(config, attn_implementation=variant.attention), dtype)


def build(variant: Variant, shape_name: str, device: str = "cpu"):
    """The models and optimizer as distill.py builds them for the variant's flags."""
    student_kwargs = SHAPES[shape_name].student
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
    dense_student = DenseStudent(student)
    if variant.compiled:
        compile_in_place((dense_student, teacher, vfm), "inductor")
    return dense_student, teacher, vfm, optimizer


class Timed(nn.Module):
    """A frozen model with a clock around its calls (the seconds of the current step in `seconds`)."""

    def __init__(self, model: nn.Module, device: str):
        super().__init__()
        self.model, self.device, self.seconds = model, device, 0.0

    def forward(self, *args):
        start = clock(self.device)
        output = self.model(*args)
        self.seconds += clock(self.device) - start
        return output


def timed_step(batch, student, teacher: Timed, context_teachers: ContextTeachers, optimizer, loss_fn,
               accelerator: Accelerator) -> dict[str, float]:
    """training/distill.py's `training_step`, backward and update, as its `run_one_batch` runs them. The teacher and
    the VFM are timed by their `Timed` wrappers; the student part (forward, losses, backward, AdamW) is the rest."""
    device = accelerator.device.type
    vfm = context_teachers.vfms[0]
    teacher.seconds = vfm.seconds = 0.0
    start = clock(device)
    terms = training_step(batch, student, teacher, context_teachers, loss_fn, accelerator)
    accelerator.backward(terms["total"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_s = clock(device) - start
    return {"vfm_s": vfm.seconds, "teacher_s": teacher.seconds, "student_s": step_s - vfm.seconds - teacher.seconds,
            "step_s": step_s}


def run_variant(variant: Variant, shape_name: str, steps: int, batch_size: int, device: str = "cpu",
                profile: bool = False) -> dict:
    rss_before = peak_rss_gib()
    student, teacher, vfm, optimizer = build(variant, shape_name, device)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if variant.autocast_bf16 else "no")
    student, optimizer = accelerator.prepare(student, optimizer)  # the student under the run's autocast, as distill.py
    teacher, context_teachers = Timed(teacher, device), ContextTeachers([Timed(vfm, device)], ["vfm"])
    batch = {key: value.to(device) for key, value in make_batch(SHAPES[shape_name], batch_size, vfm.patch_size).items()}
    rss_built = peak_rss_gib()
    with accelerator.autocast():  # the VFM forward alone first: the first thing to raise the RSS above the models
        vfm(batch["vfm"])
    vfm_forward_peak = peak_rss_gib() - rss_built
    loss_fn = DeCLIPLoss()
    measured = measure_steps(lambda: timed_step(batch, student, teacher, context_teachers, optimizer, loss_fn,
                                                accelerator), steps, batch_size, device, profile)
    return {
        **asdict(variant),
        **measured,
        "device": device,
        "vfm_view": batch["vfm"].shape[-1],
        "vfm_forward_peak_gib": vfm_forward_peak,
        "vfm_weights_gib": sum(p.numel() * p.element_size() for p in vfm.parameters()) / 2**30,
        "rss_after_imports_gib": rss_before,
    }


# --------------------------------------------------------------------------------------------------------------------
# The driver: every variant in its own process, all of them once per round, rounds one after the other, so that a
# slow spell of a shared machine hits every variant alike; ratios are taken within a round.


def peak_gib(result: dict) -> float:
    return result["peak_cuda_gib"] if result.get("peak_cuda_gib") is not None else result["peak_rss_gib"]


def summarise(name: str, rounds: list[dict], reference_rounds: list[dict]) -> dict:
    """A variant over the rounds: median images/s and part times, their range, and the median of its per-round
    ratios to the reference row (images/s and peak memory)."""
    speeds = [result["images_per_s"] for result in rounds]
    speed_ratios = [result["images_per_s"] / reference["images_per_s"]
                    for result, reference in zip(rounds, reference_rounds)]
    memory_ratios = [peak_gib(result) / peak_gib(reference) for result, reference in zip(rounds, reference_rounds)]
    median = {key: statistics.median(result[key] for result in rounds)
              for key in ("step_s", "teacher_s", "vfm_s", "student_s")}
    vfm = {key: rounds[0].get(key) for key in ("vfm_view", "vfm_weights_gib", "vfm_forward_peak_gib")}
    profiles = [result["profile"] for result in rounds if result.get("profile")]
    profile = {kind: statistics.median(shares[kind] for shares in profiles) for kind in profiles[0]} if profiles else {}
    return {"name": name, "rounds": len(rounds), "images_per_s": statistics.median(speeds), "min": min(speeds),
            "max": max(speeds), "ratio": statistics.median(speed_ratios), "ratio_min": min(speed_ratios),
            "ratio_max": max(speed_ratios), "peak_gib": max(peak_gib(result) for result in rounds),
            "memory_ratio": statistics.median(memory_ratios), **median, **vfm, "profile": profile}


def table(summaries: list[dict], reference: str) -> str:
    """One row per variant; "ratio" is its images/s over the reference row's in the same round (median over rounds,
    with the range), "memory" its peak over the reference's."""
    lines = [
        f"| variant | images/s (range) | ratio to {reference} (range) | peak GiB | memory ratio | s/step | "
        "teacher crops s | VFM s | student fwd+bwd s | VFM view px | VFM weights GiB | VFM forward peak GiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summaries:
        vfm = "| | | |" if row["vfm_view"] is None else (
            f"| {row['vfm_view']} | {row['vfm_weights_gib']:.2f} | {row['vfm_forward_peak_gib']:.2f} |")
        lines.append(
            f"| {row['name']} | {row['images_per_s']:.3f} ({row['min']:.3f}-{row['max']:.3f}) | {row['ratio']:.2f} "
            f"({row['ratio_min']:.2f}-{row['ratio_max']:.2f}) | {row['peak_gib']:.2f} | {row['memory_ratio']:.2f} | "
            f"{row['step_s']:.2f} | {row['teacher_s']:.2f} | {row['vfm_s']:.2f} | {row['student_s']:.2f} {vfm}")
    return "\n".join(lines)


def profile_table(summaries: list[dict]) -> str:
    """Where each row's step time goes (--profile: one profiled step per row and round, median shares)."""
    lines = ["| variant | matrix multiplies | fused attention | everything else | profiled step s |",
             "|---|---:|---:|---:|---:|"]
    for row in summaries:
        if row["profile"]:
            shares = row["profile"]
            lines.append(f"| {row['name']} | {shares['matmul']:.0%} | {shares['attention']:.0%} | "
                         f"{shares['other']:.0%} | {shares['profiled_s']:.1f} |")
    return "\n".join(lines)


def rates_line(label: str, rates: dict) -> str:
    return (f"{label}: fp32 matmul {rates['fp32_gflops']:.0f} GFLOP/s, bf16 {rates['bf16_gflops']:.0f} GFLOP/s, "
            f"R = {rates['R']:.2f}")


def child_command(name: str, args: argparse.Namespace) -> list[str]:
    """The process that measures one row: the authors' step (authors_step.py) or one of ours (this script)."""
    common = ["--steps", str(args.steps), "--batch_size", str(args.batch_size), "--device", args.device]
    common += (["--tiny"] if args.tiny else []) + (["--profile"] if args.profile else [])
    if name == AUTHORS_ROW:
        return [sys.executable, str(AUTHORS_STEP), "--authors_src", str(args.authors_src), *common]
    return [sys.executable, __file__, "--child", name, *common] + (["--compile"] if args.compile else [])


def compiled_label(name: str) -> str:
    """A row's name under --compile, which compiles every row."""
    return name if name.endswith("compiled") or name == AUTHORS_ROW else f"{name} (--compile)"


def measure(name: str, args: argparse.Namespace) -> dict | None:
    try:
        completed = subprocess.run(child_command(name, args), capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"{name}: did not finish within {args.timeout} s", flush=True)
        return None
    if completed.returncode != 0:
        print(f"{name}: failed (exit {completed.returncode}): {completed.stderr.strip()[-2000:]}", flush=True)
        return None
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    print(f"{name}: {json.dumps(result)}", flush=True)
    return result


def selected_rows(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    names = [variant.name for variant in VARIANTS]
    unknown = set(args.variants or ()) - set(names)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {names}")
    if args.variants:
        rows = [name for name in names if name in args.variants]
    else:
        rows = [variant.name for variant in VARIANTS if args.all or variant.default]
    if args.authors_src is not None:
        if not (args.authors_src / "training" / "declip.py").is_file():
            parser.error(f"--authors_src {args.authors_src} is not the src folder of a DeCLIP checkout (no "
                         "training/declip.py there); clone github.com/xiaomoguhz/DeCLIP and pass its src folder.")
        rows.insert(0, AUTHORS_ROW)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Tiny models instead of ViT-B/16 + DINOv2-B (a smoke test).")
    parser.add_argument("--steps", type=int, default=2, help="Measured steps per variant and round (after a warm-up).")
    parser.add_argument("--rounds", type=int, default=2, help="Times every variant is measured, interleaved.")
    parser.add_argument("--batch_size", type=int, default=2, help="Images per step.")
    parser.add_argument("--variants", nargs="*", help="Run only these variant names (default: the main ones).")
    parser.add_argument("--all", action="store_true", help="Run every variant (eager attention, other teachers).")
    parser.add_argument("--authors_src", type=Path, help="The src folder of a checkout of the DeCLIP authors' code: "
                        "adds their step as the first row, the reference of the ratios (authors_step.py).")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="Where the step runs.")
    parser.add_argument("--compile", action="store_true", help="Compile every selected variant (distill.py --compile).")
    parser.add_argument("--profile", action="store_true", help="Profile one more step per row and round and print "
                        "the shares of matrix multiplies, fused attention and everything else.")
    parser.add_argument("--matmul_seconds", type=float, default=2.0, help="Seconds per matmul-rate measurement.")
    parser.add_argument("--json", help="Also write the results (and the matmul rates) to this JSON file.")
    parser.add_argument("--timeout", type=float, default=1800, help="Give up on a variant after this many seconds.")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = parser.parse_args()
    shape_name = "tiny" if args.tiny else "vitb16"
    if args.child:
        variant = next(v for v in VARIANTS if v.name == args.child)
        if args.compile:
            variant = replace(variant, name=compiled_label(variant.name), compiled=True)
        print(json.dumps(run_variant(variant, shape_name, args.steps, args.batch_size, args.device, args.profile)))
        return
    rows = selected_rows(args, parser)
    rates = [matmul_rates(args.device, args.matmul_seconds)]
    print(rates_line("before", rates[0]), flush=True)
    results = {name: [] for name in rows}
    complete_rounds = []  # the rounds in which every row finished: ratios need the reference of the same round
    for round_index in range(args.rounds):
        measured = {name: measure(name, args) for name in rows}
        if all(result is not None for result in measured.values()):
            complete_rounds.append(round_index)
            for name, result in measured.items():
                results[name].append(result)
        rates.append(matmul_rates(args.device, args.matmul_seconds))
        print(rates_line(f"after round {round_index + 1}", rates[-1]), flush=True)
    if not complete_rounds:
        raise SystemExit("error: no round finished every variant; see the messages above.")
    label = compiled_label if args.compile else str
    summaries = [summarise(label(name), results[name], results[rows[0]]) for name in rows]
    print(f"\nbatch {args.batch_size}, {shape_name}, {args.device}, {results[rows[0]][0]['threads']} threads; "
          f"{len(complete_rounds)} round(s) of {args.steps} step(s) after a warm-up, variants interleaved; median "
          f"and range over rounds; peak GiB is "
          f"{'torch.cuda.max_memory_allocated' if args.device == 'cuda' else 'the peak RSS'}")
    for index, round_rates in enumerate(rates):
        print(rates_line("matmul rates " + ("before" if index == 0 else f"after round {index}"), round_rates))
    print()
    print(table(summaries, rows[0]))
    if args.profile:
        print("\nWhere the time goes (self CPU time of one profiled step, median over rounds):\n")
        print(profile_table(summaries))
    if args.json:
        Path(args.json).write_text(json.dumps({"matmul_rates": rates, "results": results, "summaries": summaries},
                                              indent=2))


if __name__ == "__main__":
    main()
