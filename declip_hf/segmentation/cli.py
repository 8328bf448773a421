"""Command-line conventions and options shared by `declip-segment` and `declip-evaluate`.

Both follow the same rules: `--help` shows every default, flags are never abbreviated (a prefix such as `--stri`
is refused, not guessed), settings are checked before any model loads, and a user error (a bad flag value, an
unreadable file, a checkpoint that is not a usable CLIP) ends with one `error: ...` line on stderr and exit
status 2, as argparse does for bad syntax, instead of a traceback.
"""

import argparse
import functools
import sys

import torch
import yaml

from ..models.configuration_declip import DECOUPLED_ATTENTION_MODES
from .segmenter import DeCLIPSegmenter

# What a user can cause: bad values (ValueError), missing or unreadable files, folders and Hub ids (OSError, which
# transformers, huggingface_hub and datasets raise for them) and malformed YAML specs.
USER_ERRORS = (ValueError, OSError, yaml.YAMLError)

# Devices that may be missing on the machine; others (cpu, meta, ...) always exist.
_DEVICE_AVAILABLE = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help` keeps the module docstring's layout (its example commands) and shows every flag's default (but no
    "(default: None)" after required flags and unset options)."""

    def _get_help_string(self, action):
        if action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)


def make_parser(description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, allow_abbrev=False)


def flag(name: str) -> str:
    """The flag of a setting, for error messages: `logit_scale` -> `--logit-scale`."""
    return "--" + name.replace("_", "-")


def exits_on_user_error(main):
    """Wrap a CLI's `main(argv)`: a user error becomes one `error: ...` line on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except USER_ERRORS as error:
            print(f"error: {' '.join(str(error).split())}", file=sys.stderr)  # one line, however the message wraps
            raise SystemExit(2) from None

    return wrapper


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model` (required), `--text-model`, `--decoupled-attention`, `--device` and `--windows-per-batch`: what
    `load_segmenter` and the segmenter's forward read."""
    parser.add_argument("--model", required=True,
                        help="DeCLIP or CLIP checkpoint: a local folder or a Hub id (e.g. openai/clip-vit-base-patch16 "
                        "for the CLIP baseline, or your released DeCLIP model).")
    parser.add_argument("--text-model", default=None,
                        help="Checkpoint with the CLIP text tower, if --model has none (no text_encoder/ folder).")
    parser.add_argument("--decoupled-attention", default=None, choices=DECOUPLED_ATTENTION_MODES,
                        help="Override the checkpoint's decoupled_attention (unset: keep it).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Torch device.")
    parser.add_argument("--windows-per-batch", type=int, default=16, help="Sliding-window crops per forward pass.")


def check_model_arguments(args: argparse.Namespace) -> None:
    """The options of `add_model_arguments` that can be checked before the model loads."""
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise ValueError(f"--device {args.device!r} is not a torch device: {error}") from None
    if device.type in _DEVICE_AVAILABLE and not _DEVICE_AVAILABLE[device.type]():
        raise ValueError(f"--device {args.device}: this machine has no {device.type} device; pass --device cpu.")
    if args.windows_per_batch <= 0:
        raise ValueError(f"--windows-per-batch must be a positive integer, got {args.windows_per_batch}.")


def load_segmenter(args: argparse.Namespace) -> DeCLIPSegmenter:
    """The segmenter the options of `add_model_arguments` describe, on `args.device`."""
    overrides = {"decoupled_attention": args.decoupled_attention} if args.decoupled_attention else {}
    return DeCLIPSegmenter.from_pretrained(args.model, text_model=args.text_model, **overrides).to(args.device)
