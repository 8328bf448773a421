"""Converting the DeCLIP authors' EVA02-CLIP checkpoints (docs/method.md §8): a tiny random state dict in their key
layout, saved as `{"state_dict": ...}` with DDP's `module.` prefixes."""

import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import tokenize as open_clip_tokenize
from PIL import Image
from transformers import AutoModel, CLIPTextModelWithProjection

from declip_hf import DeCLIPEvaVisionConfig, DeCLIPEvaVisionModel, DeCLIPSegmenter
from declip_hf.hub.convert_open_clip_to_hf import main
from declip_hf.models.tiny import tiny_clip_tokenizer
from tests.test_modeling_eva import block_reference, decoupled_reference, embed_reference, layer_norm, rope_reference

TOKENIZER = tiny_clip_tokenizer()
# Head width 64 as in every EVA02-CLIP: 2 heads of 64 in both towers.
WIDTH, TEXT_WIDTH, PROJECTION = 128, 128, 16


def authors_rope_buffers(grid: int, head_dim: int) -> dict[str, torch.Tensor]:
    """freqs_cos / freqs_sin as the authors' VisionRotaryEmbeddingFast stores them, rebuilt from the reference's
    complex rotation of a unit vector: (grid*grid, head_dim), each angle repeated for its channel pair."""
    ones = torch.zeros(1, 1 + grid * grid, head_dim)
    ones[..., 0::2] = 1.0  # (1, 0) pairs: the rotation gives (cos, sin) in each pair
    rotated = rope_reference(ones, grid, grid)[0, 1:]
    cos, sin = rotated[:, 0::2], rotated[:, 1::2]
    return {"freqs_cos": cos.repeat_interleave(2, -1), "freqs_sin": sin.repeat_interleave(2, -1)}


def authors_checkpoint(tmp_path, with_rope_from=None):
    """(source vision model, open_clip text CLIP, path of a .pt in the authors' EVA-CLIP layout)."""
    torch.manual_seed(0)
    vision = DeCLIPEvaVisionModel(DeCLIPEvaVisionConfig(
        hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2, intermediate_size=int(WIDTH * 2.6667),
        image_size=32, patch_size=8, projection_dim=PROJECTION,
    )).eval()
    with torch.no_grad():
        for parameter in vision.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    text = CLIP(
        embed_dim=PROJECTION, vision_cfg=CLIPVisionCfg(image_size=32, layers=1, width=64, patch_size=8),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=len(TOKENIZER), width=TEXT_WIDTH, heads=2, layers=2),
        quick_gelu=False,
    ).eval()
    with torch.no_grad():
        for parameter in text.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    state_dict = {f"visual.{key}": value for key, value in vision.state_dict().items()}
    rope = with_rope_from or authors_rope_buffers(4, WIDTH // 2)
    for name, table in rope.items():
        state_dict[f"visual.rope.{name}"] = table
        for block in range(2):
            state_dict[f"visual.blocks.{block}.attn.rope.{name}"] = table
    state_dict.update({f"text.{key}": value for key, value in text.state_dict().items() if not key.startswith("visual.")})
    state_dict["text.logit_scale"] = state_dict.pop("text.logit_scale")
    state_dict = {f"module.{key}": value for key, value in state_dict.items()}
    torch.save({"state_dict": state_dict, "epoch": 6}, tmp_path / "declip_eva.pt")
    return vision, text, str(tmp_path / "declip_eva.pt")


def pixels():
    return torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(3))


def test_authors_eva_checkpoint_converts_and_matches_written_out_forwards(tmp_path):
    source, text_clip, checkpoint = authors_checkpoint(tmp_path)
    tokenizer_dir = tmp_path / "tokenizer"
    TOKENIZER.save_pretrained(tokenizer_dir)
    out = tmp_path / "converted"
    main([checkpoint, "--arch", "EVA02-CLIP-B-16", "--out", str(out), "--with-text", "--tokenizer", str(tokenizer_dir)])

    model = AutoModel.from_pretrained(out)
    assert type(model) is DeCLIPEvaVisionModel and model.config.decoupled_attention == "csa"
    assert (model.config.hidden_size, model.config.num_attention_heads, model.config.intermediate_size) == (128, 2, 341)
    for name, tensor in source.state_dict().items():  # every vision tensor lands under its own name
        assert torch.equal(model.state_dict()[name], tensor), name
    with torch.no_grad():
        x, grid = embed_reference(source, pixels())
        for block in source.blocks:
            x = block_reference(block, x, grid, 2)
        expected = layer_norm(x[:, 0], source.norm) @ source.head.weight.T + source.head.bias
        torch.testing.assert_close(model.get_image_features(pixels()).pooler_output, expected, atol=1e-5, rtol=1e-4)
        dense_map, _ = decoupled_reference(source, pixels(), "csa")
        torch.testing.assert_close(model.get_dense_features(pixels()).dense_embeds,
                                   torch.nn.functional.normalize(dense_map, dim=1), atol=1e-5, rtol=1e-4)

    text_model = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder").eval()
    assert text_model.config.hidden_act == "gelu"
    texts = ["a cat", "a dog on grass"]
    ids = TOKENIZER(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(text_model(input_ids=ids).text_embeds, text_clip.encode_text(ids), atol=1e-5, rtol=0)
    assert open_clip_tokenize  # the BPE path itself is covered in test_convert.py

    segmenter = DeCLIPSegmenter.from_pretrained(out)
    assert type(segmenter.vision_model) is DeCLIPEvaVisionModel
    image = Image.new("RGB", (40, 24), (200, 30, 30))
    with torch.no_grad():
        output = segmenter([image], ["red", "blue"])
    assert output.label_maps[0].shape == (24, 40)


def test_vision_only_conversion_and_mode_flag(tmp_path):
    _, _, checkpoint = authors_checkpoint(tmp_path)
    out = tmp_path / "converted"
    main([checkpoint, "--arch", "EVA02-CLIP-L-14-336", "--out", str(out), "--decoupled-attention", "qq"])
    assert DeCLIPEvaVisionModel.from_pretrained(out).config.decoupled_attention == "qq"
    assert not (out / "text_encoder").exists()


def test_rope_tables_of_another_construction_are_refused(tmp_path):
    wrong = {name: table.flip(0) for name, table in authors_rope_buffers(4, WIDTH // 2).items()}
    _, _, checkpoint = authors_checkpoint(tmp_path, with_rope_from=wrong)
    with pytest.raises(SystemExit, match="visual.rope.freqs_cos differs from EVA02's rotary embedding"):
        main([checkpoint, "--arch", "EVA02-CLIP-B-16", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_eva_checkpoint_under_an_openai_arch_and_unknown_archs_are_refused(tmp_path):
    _, _, checkpoint = authors_checkpoint(tmp_path)
    with pytest.raises(SystemExit, match="EVA02-CLIP vision tower .*--arch EVA02-CLIP-B-16 or EVA02-CLIP-L-14-336"):
        main([checkpoint, "--arch", "ViT-B-16-quickgelu", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="Unknown architecture 'EVA02-CLIP-bigE-14'.*EVA02-CLIP-B-16"):
        main([checkpoint, "--arch", "EVA02-CLIP-bigE-14", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="plain GELU"):
        main([checkpoint, "--arch", "EVA02-CLIP-B-16", "--out", str(tmp_path / "out"), "--hidden-act", "quick_gelu"])
    assert not (tmp_path / "out").exists()


def test_an_openai_checkpoint_under_an_eva_arch_and_unmapped_tensors_are_refused(tmp_path):
    _, text_clip, checkpoint = authors_checkpoint(tmp_path)
    torch.save(text_clip.state_dict(), tmp_path / "openai.pt")
    with pytest.raises(SystemExit, match="No EVA02-CLIP vision tower in the authors' layout"):
        main([str(tmp_path / "openai.pt"), "--arch", "EVA02-CLIP-B-16", "--out", str(tmp_path / "out")])
    state_dict = torch.load(checkpoint, weights_only=True)["state_dict"]
    state_dict["module.visual.blocks.1.gamma_1"] = torch.ones(WIDTH)  # layer scale: a variant we do not map
    torch.save({"state_dict": state_dict}, tmp_path / "layer_scale.pt")
    with pytest.raises(SystemExit, match=r"unexpected \['visual.blocks.1.gamma_1'\]"):
        main([str(tmp_path / "layer_scale.pt"), "--arch", "EVA02-CLIP-B-16", "--out", str(tmp_path / "out")])
