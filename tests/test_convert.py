"""open_clip -> DeCLIP conversion: parity with open_clip itself on a small random OpenAI-style CLIP, shape inference
for the real architectures (meta tensors), and clear refusals of other architectures."""

import json

import pytest
import torch
import torch.nn.functional as F
from open_clip.factory import get_model_config
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP
from open_clip.tokenizer import tokenize as open_clip_tokenize
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPTextModelWithProjection

from declip_hf import DeCLIPSegmenter, DeCLIPVisionModel
from declip_hf.hub import convert_open_clip_to_hf
from declip_hf.hub.convert_open_clip_to_hf import (
    CLIP_BPE_VOCAB_SIZE,
    OPEN_CLIP_ARCHITECTURES,
    TextShape,
    VisionShape,
    check_shape,
    convert_open_clip_state_dict,
    expected_text_shape,
    expected_vision_shape,
    infer_text_shape,
    infer_vision_shape,
    load_open_clip_state_dict,
    main,
    reject_foreign_architecture,
    vision_config,
)
from declip_hf.models.tiny import tiny_clip_tokenizer

TOKENIZER = tiny_clip_tokenizer()


def small_architecture(quick_gelu: bool) -> dict:
    """An open_clip model config: OpenAI layout at toy size (odd mlp ratio and head width catch shape mix-ups)."""
    return {
        "embed_dim": 24,
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 4, "mlp_ratio": 3.0},
        "text_cfg": {"context_length": 77, "vocab_size": len(TOKENIZER), "width": 32, "heads": 4, "layers": 2},
    }


def random_open_clip(architecture: dict) -> CLIP:
    torch.manual_seed(0)
    model = CLIP(
        embed_dim=architecture["embed_dim"],
        vision_cfg=CLIPVisionCfg(**architecture["vision_cfg"]),
        text_cfg=CLIPTextCfg(**architecture["text_cfg"]),
        quick_gelu=architecture["quick_gelu"],
    ).eval()
    # open_clip initialises biases and norms to 0 / 1; perturb everything so every mapped tensor matters.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def declip_dense_reference(model: CLIP, pixel_values: torch.Tensor) -> torch.Tensor:
    """DeCLIP's `csa` content features computed plainly from open_clip's own modules and tensors (docs/method.md §1)."""
    visual = model.visual
    captured = {}
    last = visual.transformer.resblocks[-1]
    handle = last.register_forward_pre_hook(lambda module, inputs: captured.setdefault("x", inputs[0]))
    visual(pixel_values)
    handle.remove()
    x = captured["x"]  # (B, 1+N, C), input of the last block
    width, heads = x.shape[-1], x.shape[-1] // 8
    y = last.ln_1(x)
    q, k, v = F.linear(y, last.attn.in_proj_weight, last.attn.in_proj_bias).split(width, dim=-1)

    def per_head(tensor):
        return tensor.unflatten(-1, (heads, width // heads)).transpose(1, 2)  # (B, H, T, d)

    q, k, v = per_head(q), per_head(k), per_head(v)
    scale = (width // heads) ** -0.5
    weights = (q @ q.transpose(-1, -2) * scale).softmax(-1) + (k @ k.transpose(-1, -2) * scale).softmax(-1)
    attended = (weights @ v).transpose(1, 2).flatten(2)
    content = visual.ln_post(last.attn.out_proj(attended)) @ visual.proj  # (B, 1+N, D)
    return F.normalize(content[:, 1:], dim=-1)


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_converted_checkpoint_matches_open_clip(quick_gelu, tmp_path):
    architecture = small_architecture(quick_gelu)
    model = random_open_clip(architecture)
    # An open_clip training checkpoint: state dict under `state_dict`, DDP's `module.` prefix, optimizer alongside.
    checkpoint = {"epoch": 1, "name": "run", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    torch.save(checkpoint, tmp_path / "epoch_1.pt")
    (tmp_path / "arch.json").write_text(json.dumps(architecture))
    TOKENIZER.save_pretrained(tmp_path / "tokenizer")
    out = tmp_path / "converted"
    main(
        [
            str(tmp_path / "epoch_1.pt"),
            "--arch",
            str(tmp_path / "arch.json"),
            "--out",
            str(out),
            "--with-text",
            "--tokenizer",
            str(tmp_path / "tokenizer"),
            "--decoupled-attention",
            "csa",
            "--hidden-act",
            "quick_gelu" if quick_gelu else "gelu",
        ]
    )
    vision = DeCLIPVisionModel.from_pretrained(out).eval()
    text = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "text_encoder")
    assert vision.config.decoupled_attention == "csa" and vision.config.num_attention_heads == 4

    pixel_values = torch.randn(2, 3, 32, 32)
    captured = {}
    handle = model.visual.transformer.register_forward_hook(
        lambda module, inputs, output: captured.setdefault("tokens", output)
    )
    with torch.no_grad():
        open_clip_embeds = model.encode_image(pixel_values)
        handle.remove()
        outputs = vision(pixel_values=pixel_values)
        torch.testing.assert_close(vision.get_image_features(pixel_values).pooler_output, open_clip_embeds, atol=1e-5, rtol=0)
        # CLIPVisionModel's last_hidden_state is the encoder output before the post layer norm.
        torch.testing.assert_close(outputs.last_hidden_state, captured["tokens"], atol=1e-5, rtol=0)
        dense = vision.get_dense_features(pixel_values).dense_embeds  # (B, D, 8, 8)
        reference = declip_dense_reference(model, pixel_values).transpose(1, 2).unflatten(-1, (8, 8))
        torch.testing.assert_close(dense, reference, atol=1e-5, rtol=0)

        ids = tokenizer(
            ["a cat", "two dogs on the grass"], padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        torch.testing.assert_close(text(input_ids=ids).text_embeds, model.encode_text(ids), atol=1e-5, rtol=0)
    assert text.config.logit_scale == pytest.approx(model.logit_scale.item())


def test_checkpoint_formats_read_alike(tmp_path):
    state_dict = random_open_clip(small_architecture(True)).state_dict()
    torch.save(state_dict, tmp_path / "bare.pt")
    torch.save({"state_dict": state_dict, "epoch": 3}, tmp_path / "wrapped.pt")
    torch.save({f"module.{key}": value for key, value in state_dict.items()}, tmp_path / "ddp.bin")
    save_file({key: value.contiguous() for key, value in state_dict.items()}, tmp_path / "model.safetensors")
    for name in ("bare.pt", "wrapped.pt", "ddp.bin", "model.safetensors"):
        loaded = load_open_clip_state_dict(tmp_path / name)
        assert loaded.keys() == state_dict.keys(), name
        assert all(torch.equal(loaded[key], state_dict[key]) for key in state_dict), name


OPENAI_SHAPES = {
    # name: (vision: width, layers, mlp, patch, image, embed), (text: width, layers, mlp, context, vocab, embed), heads
    "ViT-B-16": (VisionShape(768, 12, 3072, 16, 224, 512), TextShape(512, 12, 2048, 77, 49408, 512), 12),
    "ViT-L-14": (VisionShape(1024, 24, 4096, 14, 224, 768), TextShape(768, 12, 3072, 77, 49408, 768), 16),
    "ViT-L-14-336": (VisionShape(1024, 24, 4096, 14, 336, 768), TextShape(768, 12, 3072, 77, 49408, 768), 16),
}


def meta_state_dict(open_clip_name: str) -> dict[str, torch.Tensor]:
    """open_clip's own state dict for a named architecture, as shapes only (meta tensors: no memory, no init)."""
    config = dict(get_model_config(open_clip_name))
    model_class = CustomTextCLIP if config.pop("custom_text", False) else CLIP
    with torch.device("meta"):
        return model_class(**config).state_dict()


@pytest.mark.parametrize("name", sorted(OPENAI_SHAPES))
def test_shape_inference_for_openai_architectures(name):
    vision_shape, text_shape, heads = OPENAI_SHAPES[name]
    state_dict = meta_state_dict(f"{name}-quickgelu")
    reject_foreign_architecture(state_dict)
    assert infer_vision_shape(state_dict) == vision_shape
    assert infer_text_shape(state_dict) == text_shape
    for arch in (name, f"{name}-quickgelu"):
        assert expected_vision_shape(OPEN_CLIP_ARCHITECTURES[arch]) == vision_shape
        assert expected_text_shape(OPEN_CLIP_ARCHITECTURES[arch]) == text_shape
    config = vision_config(vision_shape, OPEN_CLIP_ARCHITECTURES[f"{name}-quickgelu"], "quick_gelu", "qq")
    assert (config.num_attention_heads, config.intermediate_size, config.image_size) == (
        heads,
        vision_shape.mlp_width,
        vision_shape.image_size,
    )


def test_wrong_architecture_names_the_differences():
    state_dict = meta_state_dict("ViT-L-14-336-quickgelu")
    with pytest.raises(ValueError, match=r"image_size: checkpoint 336, architecture 224"):
        check_shape(
            infer_vision_shape(state_dict), expected_vision_shape(OPEN_CLIP_ARCHITECTURES["ViT-L-14"]), "vision"
        )
    with pytest.raises(
        ValueError, match=r"width: checkpoint 1024, architecture 768.*patch_size: checkpoint 14, architecture 16"
    ):
        convert_open_clip_state_dict(state_dict, OPEN_CLIP_ARCHITECTURES["ViT-B-16-quickgelu"])


def test_activation_must_be_stated(tmp_path):
    state_dict = meta_state_dict("ViT-B-16-quickgelu")
    with pytest.raises(ValueError, match="pass --hidden-act quick_gelu"):
        convert_open_clip_state_dict(state_dict, OPEN_CLIP_ARCHITECTURES["ViT-B-16"])
    with pytest.raises(ValueError, match="contradicts the architecture, which states quick_gelu"):
        convert_open_clip_state_dict(state_dict, OPEN_CLIP_ARCHITECTURES["ViT-B-16-quickgelu"], hidden_act="gelu")


EVA_CLIP_KEYS = {  # the EVA-CLIP repository's layout (DeCLIP's EVA02 checkpoints come from it)
    "visual.cls_token": (1, 1, 32),
    "visual.pos_embed": (1, 65, 32),
    "visual.patch_embed.proj.weight": (32, 3, 4, 4),
    "visual.rope.freqs_cos": (64, 8),
    "visual.blocks.0.attn.q_proj.weight": (32, 32),
}


@pytest.mark.parametrize(
    "state_dict, found",
    [
        ({key: torch.zeros(shape) for key, shape in EVA_CLIP_KEYS.items()}, "an EVA / EVA02-CLIP vision tower"),
        ({"visual.trunk.blocks.0.attn.qkv.weight": torch.zeros(96, 32)}, "a timm trunk"),
        (
            {
                "visual.layer1.0.conv1.weight": torch.zeros(8, 8, 1, 1),
                "visual.attnpool.c_proj.weight": torch.zeros(8, 8),
            },
            "a ModifiedResNet",
        ),
        ({"transformer.resblocks.0.ln_1.weight": torch.zeros(8)}, "No OpenAI-style open_clip vision tower"),
    ],
    ids=["eva-clip", "timm-trunk", "modified-resnet", "text-only"],
)
def test_other_architectures_are_refused_by_name(state_dict, found, tmp_path, capsys):
    torch.save(state_dict, tmp_path / "checkpoint.pt")
    with pytest.raises(SystemExit, match=f"Conversion failed: .*{found}"):
        main([str(tmp_path / "checkpoint.pt"), "--arch", "ViT-B-16-quickgelu", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name, found",
    [
        ("RN50", r"a ModifiedResNet .* \(e\.g\. 'visual\.layer1\."),
        ("EVA02-B-16", r"a timm trunk .* \(e\.g\. 'visual\.trunk\."),
    ],
)
def test_open_clip_resnet_and_eva_models_are_refused(name, found):
    """open_clip's own RN50 and EVA02 (timm trunk) state dicts, built on the meta device."""
    with pytest.raises(ValueError, match=found):
        reject_foreign_architecture(meta_state_dict(name))


def test_unmapped_tensors_are_refused():
    state_dict = random_open_clip(small_architecture(True)).state_dict()
    state_dict["visual.transformer.resblocks.1.attn.head_scale"] = torch.ones(4, 1, 1)
    with pytest.raises(
        ValueError,
        match=r"CLIP does not: \['visual\.transformer\.resblocks\.1\.attn\.head_scale'\]",
    ):
        convert_open_clip_state_dict(state_dict, small_architecture(True))


def test_tokenizer_must_match_the_text_tower():
    architecture = small_architecture(True)
    state_dict = random_open_clip(architecture).state_dict()
    state_dict["token_embedding.weight"] = state_dict["token_embedding.weight"][:-3]
    architecture["text_cfg"]["vocab_size"] -= 3
    with pytest.raises(
        ValueError, match=f"tokenizer has {len(TOKENIZER)} tokens; the text tower expects {len(TOKENIZER) - 3}"
    ):
        convert_open_clip_state_dict(state_dict, architecture, with_text=True, tokenizer=TOKENIZER)


def _save_checkpoint(architecture: dict, folder) -> tuple[CLIP, str, str]:
    model = random_open_clip(architecture)
    torch.save(model.state_dict(), folder / "model.pt")
    (folder / "arch.json").write_text(json.dumps(architecture))
    return model, str(folder / "model.pt"), str(folder / "arch.json")


def test_text_tower_without_tokenizer_gets_openai_clip_bpe(tmp_path):
    """`--with-text` without `--tokenizer` on a tower with CLIP's 49408-token vocabulary writes OpenAI CLIP's BPE
    tokenizer (from open_clip's own vocabulary file): token ids and text embeddings match open_clip's, and the folder
    loads as a segmenter."""
    architecture = small_architecture(quick_gelu=True)
    architecture["text_cfg"]["vocab_size"] = CLIP_BPE_VOCAB_SIZE
    model, checkpoint, arch = _save_checkpoint(architecture, tmp_path)
    out = tmp_path / "converted"
    main([checkpoint, "--arch", arch, "--out", str(out), "--with-text"])

    tokenizer = AutoTokenizer.from_pretrained(out / "text_encoder")
    texts = ["a photo of a cat.", "Two DOGS on the grass!!", "naïve café, 東京", "it's a traffic-light, isn't it?"]
    for text in texts:
        expected = open_clip_tokenize([text])[0]
        expected = expected[: int(expected.argmax()) + 1].tolist()  # up to <end_of_text>, the largest id
        assert tokenizer(text).input_ids == expected, text
    segmenter = DeCLIPSegmenter.from_pretrained(out)
    text_model = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder").eval()
    ids = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(
            text_model(input_ids=ids).text_embeds, model.encode_text(open_clip_tokenize(texts)), atol=1e-5, rtol=0
        )
    assert segmenter.tokenizer("a cat").input_ids == tokenizer("a cat").input_ids


def test_text_tower_without_tokenizer_is_refused_when_no_standard_one_fits(tmp_path, monkeypatch):
    """The tiny tower's 514-token vocabulary is not CLIP's BPE, and without open_clip's vocabulary file no
    tokenizer can be built: both refuse before writing anything, naming --tokenizer."""
    _, checkpoint, arch = _save_checkpoint(small_architecture(quick_gelu=True), tmp_path)
    out = tmp_path / "converted"
    with pytest.raises(SystemExit, match=f"text tower has {len(TOKENIZER)} tokens, not the 49408.*pass --tokenizer"):
        main([checkpoint, "--arch", arch, "--out", str(out), "--with-text"])
    assert not out.exists()

    architecture = small_architecture(quick_gelu=True)
    architecture["text_cfg"]["vocab_size"] = CLIP_BPE_VOCAB_SIZE
    _, checkpoint, arch = _save_checkpoint(architecture, tmp_path)
    monkeypatch.setattr(convert_open_clip_to_hf, "open_clip_bpe_path", lambda: None)
    with pytest.raises(SystemExit, match="pip install open_clip_torch, or pass --tokenizer"):
        main([checkpoint, "--arch", arch, "--out", str(out), "--with-text"])
    assert not out.exists()


def test_convert_flags_show_defaults_and_refuse_abbreviations(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "(default: qq)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["model.pt", "--arch", "ViT-B-16", "--out", "x", "--with"])  # an abbreviation of --with-text
    assert exit_info.value.code == 2 and "--with" in capsys.readouterr().err
