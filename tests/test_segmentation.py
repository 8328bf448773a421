"""Zero-shot segmentation: templates, sliding windows, class embeddings, thresholding, loading, and the demo."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn
from transformers import CLIPModel, CLIPTextModelWithProjection, CLIPTokenizer

from declip_hf import DeCLIPVisionModel, DeCLIPDenseOutput
from declip_hf.segmentation.prompts import OPENAI_IMAGENET_TEMPLATES
from declip_hf.segmentation.segment import main as segment_main
from declip_hf.segmentation.segmenter import (
    ClassEmbeddings,
    DeCLIPSegmenter,
    patch_padding,
    resized_shape,
    slide_inference,
    sliding_windows,
    split_class_names,
)


def test_prompt_templates_are_openais_80():
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert len(set(OPENAI_IMAGENET_TEMPLATES)) == 80
    assert all(template.count("{}") == 1 for template in OPENAI_IMAGENET_TEMPLATES)
    assert OPENAI_IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert OPENAI_IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES as open_clip_templates

    assert list(OPENAI_IMAGENET_TEMPLATES) == [template("{}") for template in open_clip_templates]


def test_sliding_window_count_map_for_an_odd_size():
    # 7 x 11 image, window 4, stride 3. Rows: windows [0,4) and [3,7) (the second clipped back from [3,7)).
    # Columns: [0,4), [3,7), [6,10) and [7,11) (the last one shifted back from [9,13) to end at the border).
    row_counts = torch.tensor([1, 1, 1, 2, 1, 1, 1.0])
    col_counts = torch.tensor([1, 1, 1, 2, 1, 1, 2, 2, 2, 2, 1.0])
    expected = row_counts[:, None] * col_counts[None, :]
    assert sliding_windows(7, 11, 4, 3) == [
        (0, 4, 0, 4), (0, 4, 3, 7), (0, 4, 6, 10), (0, 4, 7, 11),
        (3, 7, 0, 4), (3, 7, 3, 7), (3, 7, 6, 10), (3, 7, 7, 11),
    ]
    output = slide_inference(torch.zeros(1, 3, 7, 11), lambda crops: crops[:, :2], 4, 3, num_classes=2)
    torch.testing.assert_close(output.count_map, expected)


def test_slide_inference_puts_every_window_back_in_place():
    # With an identity "model" each pixel averages copies of itself: the output must equal the input exactly.
    image = torch.randn(2, 3, 9, 13)
    output = slide_inference(image, lambda crops: crops, window=5, stride=2, num_classes=3, windows_per_batch=4)
    torch.testing.assert_close(output.logits, image)
    # A window larger than the image shrinks to it: one window, counts all 1.
    output = slide_inference(image, lambda crops: crops * 2, window=32, stride=8, num_classes=3)
    torch.testing.assert_close(output.logits, image * 2)
    assert output.count_map.eq(1).all()


def test_slide_inference_weights_windows_by_coverage():
    # Each window returns its own index everywhere: pixel values are the mean index of the windows covering them.
    calls = iter(range(100))

    def window_index(crops):
        return torch.stack([torch.full_like(crop[:1], float(next(calls))) for crop in crops])

    output = slide_inference(torch.zeros(1, 3, 7, 11), window_index, 4, 3, num_classes=1, windows_per_batch=1)
    boxes = sliding_windows(7, 11, 4, 3)
    for y in range(7):
        for x in range(11):
            covering = [index for index, (y1, y2, x1, x2) in enumerate(boxes) if y1 <= y < y2 and x1 <= x < x2]
            assert math.isclose(output.logits[0, 0, y, x].item(), sum(covering) / len(covering), rel_tol=1e-6)


def test_resize_and_patch_padding_follow_mmseg_and_sclip():
    assert resized_shape(375, 500, 448) == (448, 597)  # a VOC image: shorter side to 448, ratio kept, rounded
    assert resized_shape(1024, 2048, 560) == (560, 1120)
    assert resized_shape(100, 5000, 448, max_longer_side=2048) == (41, 2048)  # the longer side is capped
    assert patch_padding(336, 336, 16) == (0, 0, 0, 0)
    assert patch_padding(30, 21, 16) == (5, 6, 1, 1)  # (left, right, top, bottom), extra pixel right/bottom


def test_split_class_names():
    assert split_class_names(["cat", "person; people", ["dog", " puppy "]]) == [
        ("cat",), ("person", "people"), ("dog", "puppy"),
    ]
    with pytest.raises(ValueError, match="no name"):
        split_class_names(["cat", " ; "])


# --------------------------------------------------------------------------------------------------------------------
# Class embeddings and the segmenter on the tiny checkpoint
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmenter(tiny_clip_dir):
    return DeCLIPSegmenter.from_pretrained(tiny_clip_dir)


def test_class_embeddings_are_template_ensembles(segmenter, tiny_clip_dir):
    classes = segmenter.encode_classes(["cat", "dog; puppy"])
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip_dir)

    def ensemble(name):
        prompts = [template.format(name) for template in OPENAI_IMAGENET_TEMPLATES]
        tokens = tokenizer(prompts, padding=True, return_tensors="pt")
        with torch.no_grad():
            embeds = clip.get_text_features(**tokens)
        embeds = embeds if torch.is_tensor(embeds) else embeds.pooler_output
        mean = (embeds / embeds.norm(dim=-1, keepdim=True)).mean(dim=0)
        return mean / mean.norm()

    expected = torch.stack([ensemble("cat"), ensemble("dog"), ensemble("puppy")])
    torch.testing.assert_close(classes.name_embeds, expected, atol=1e-5, rtol=1e-5)
    assert classes.name_to_class.tolist() == [0, 1, 1]
    assert classes.num_classes == 2


def test_class_embeddings_are_cached(segmenter):
    segmenter.encode_classes(["zebra", "giraffe"])
    calls = []
    handle = segmenter.text_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        again = segmenter.encode_classes(["giraffe", "zebra"])
        assert calls == []  # nothing re-encoded
        segmenter.encode_classes(["zebra", "okapi"])
        assert len(calls) == 1  # only the new name
    finally:
        handle.remove()
    assert again.name_embeds.shape == (2, 24)


def test_segmenter_outputs_label_maps_at_input_sizes(segmenter):
    images = [
        Image.new("RGB", (35, 21), (200, 30, 30)),
        torch.rand(3, 30, 30),
        torch.randint(0, 256, (3, 30, 30), dtype=torch.uint8),  # same size as the previous one: batched together
    ]
    output = segmenter(images, ["red", "green; grass", "blue"], shorter_side=24, window=16, stride=8,
                       return_probabilities=True)
    assert [tuple(label_map.shape) for label_map in output.label_maps] == [(21, 35), (30, 30), (30, 30)]
    assert all(label_map.dtype == torch.long for label_map in output.label_maps)
    for label_map, probabilities in zip(output.label_maps, output.probabilities):
        assert probabilities.shape == (3, *label_map.shape)
        torch.testing.assert_close(label_map, probabilities.argmax(dim=0))
    # Batched and one-by-one inference agree.
    alone = segmenter([images[2]], ["red", "green; grass", "blue"], shorter_side=24, window=16, stride=8)
    torch.testing.assert_close(alone.label_maps[0], output.label_maps[2])


def test_segmenter_runs_under_bf16_autocast(segmenter):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = segmenter([torch.rand(3, 20, 28)], ["a", "b"], shorter_side=24, window=16, stride=8)
    assert output.label_maps[0].shape == (20, 28)


# --------------------------------------------------------------------------------------------------------------------
# Thresholding and multi-name classes, with known dense features
# --------------------------------------------------------------------------------------------------------------------


class PixelFeatureModel(nn.Module):
    """Stands in for the vision model: patch size 1, each pixel's normalised RGB is its dense feature."""

    patch_size = 1

    def get_dense_features(self, pixel_values):
        return DeCLIPDenseOutput(dense_embeds=F.normalize(pixel_values, dim=1), context_features=())


def test_multi_name_max_and_background_threshold():
    # No text side is needed: the class embeddings are given.
    segmenter = DeCLIPSegmenter(PixelFeatureModel(), nn.Identity(), None, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    # Class 0 ("background") has name e_x; class 1 has two names e_y and e_z.
    classes = ClassEmbeddings(name_embeds=torch.eye(3), name_to_class=torch.tensor([0, 1, 1]))
    pixels = torch.tensor([
        [1.0, 0.0, 0.0],  # clearly class 0
        [0.0, 1.0, 0.0],  # class 1 through its first name
        [0.0, 0.0, 1.0],  # class 1 through its second name
        [0.8, 1.0, 1.0],  # class 1 wins the argmax, but its probability (about 0.44) is below the threshold
        [0.9, 1.0, 0.0],  # class 1, probability about 0.68: above the threshold
    ])
    image = pixels.T.reshape(3, 1, 5)  # one row of 5 pixels
    scale, threshold = 10.0, 0.5
    output = segmenter([image], classes, shorter_side=1, window=8, stride=4, logit_scale=scale,
                       background_threshold=threshold, return_probabilities=True)

    expected_labels, expected_probs = [], []
    for pixel in pixels:
        cosine = [float(pixel[axis] / pixel.norm()) for axis in range(3)]
        exps = [math.exp(scale * value) for value in cosine]
        name_probs = [value / sum(exps) for value in exps]
        class_probs = [name_probs[0], max(name_probs[1], name_probs[2])]
        label = 0 if class_probs[0] >= class_probs[1] else 1
        expected_labels.append(0 if max(class_probs) < threshold else label)
        expected_probs.append(class_probs)
    torch.testing.assert_close(output.probabilities[0][:, 0, :].T, torch.tensor(expected_probs))
    assert output.label_maps[0][0].tolist() == expected_labels
    assert expected_labels == [0, 1, 1, 0, 1]  # the uncertain pixel went to background
    no_threshold = segmenter([image], classes, shorter_side=1, window=8, stride=4, logit_scale=scale)
    assert no_threshold.label_maps[0][0].tolist() == [0, 1, 1, 1, 1]


def test_max_over_names_along_any_dim_with_interleaved_names():
    # Names of a class need not be adjacent: classes 0, 2, 0, 1, 2.
    classes = ClassEmbeddings(name_embeds=torch.zeros(5, 4), name_to_class=torch.tensor([0, 2, 0, 1, 2]))
    scores = torch.randn(3, 5, 2)  # names along dim 1
    per_class = classes.max_over_names(scores, dim=1)
    assert per_class.shape == (3, 3, 2)
    for row in range(3):
        for column in range(2):
            values = scores[row, :, column].tolist()
            expected = [max(values[0], values[2]), values[3], max(values[1], values[4])]
            assert per_class[row, :, column].tolist() == expected
    torch.testing.assert_close(classes.max_over_names(scores.transpose(0, 1), dim=0), per_class.transpose(0, 1))


def test_probabilities_only_when_asked(segmenter):
    output = segmenter([torch.rand(3, 12, 12)], ["a", "b"], shorter_side=12, window=8, stride=4)
    assert output.probabilities is None
    asked = segmenter([torch.rand(3, 12, 12)], ["a", "b"], shorter_side=12, window=8, stride=4,
                      return_probabilities=True)
    assert asked.probabilities[0].device == asked.label_maps[0].device == torch.device("cpu")


# --------------------------------------------------------------------------------------------------------------------
# Loading: text tower from a text_encoder/ subfolder, from the root, or an error
# --------------------------------------------------------------------------------------------------------------------


def test_loads_text_encoder_subfolder_of_a_declip_folder(tmp_path, tiny_clip_dir):
    DeCLIPVisionModel.from_pretrained(tiny_clip_dir, decoupled_attention="csa").save_pretrained(tmp_path)
    text_model = CLIPTextModelWithProjection.from_pretrained(tiny_clip_dir)
    text_model.save_pretrained(tmp_path / "text_encoder")
    CLIPTokenizer.from_pretrained(tiny_clip_dir).save_pretrained(tmp_path / "text_encoder")
    segmenter = DeCLIPSegmenter.from_pretrained(tmp_path)
    assert segmenter.vision_model.config.decoupled_attention == "csa"
    torch.testing.assert_close(segmenter.text_model.text_projection.weight, text_model.text_projection.weight)
    assert segmenter.encode_classes(["cat"]).name_embeds.shape == (1, 24)


def test_vision_only_folder_needs_a_text_model(tmp_path, tiny_clip_dir):
    DeCLIPVisionModel.from_pretrained(tiny_clip_dir).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no CLIP text tower"):
        DeCLIPSegmenter.from_pretrained(tmp_path)
    segmenter = DeCLIPSegmenter.from_pretrained(tmp_path, text_model=str(tiny_clip_dir))
    reference = DeCLIPSegmenter.from_pretrained(tiny_clip_dir)
    torch.testing.assert_close(
        segmenter.encode_classes(["cat"]).name_embeds, reference.encode_classes(["cat"]).name_embeds
    )


# --------------------------------------------------------------------------------------------------------------------
# Demo
# --------------------------------------------------------------------------------------------------------------------


def test_demo_writes_an_overlay_with_a_legend(tmp_path, tiny_clip_dir):
    image = Image.new("RGB", (40, 30), (90, 160, 60))
    ImageDraw.Draw(image).ellipse([5, 5, 20, 25], fill=(200, 120, 40))
    image.save(tmp_path / "in.png")
    out = tmp_path / "overlay.png"
    segment_main([str(tmp_path / "in.png"), "--labels", "cat,dog;puppy,grass", "--out", str(out), "--model",
                  str(tiny_clip_dir), "--shorter-side", "32", "--window", "16", "--stride", "8"])
    written = Image.open(out)
    assert written.format == "PNG"
    assert written.width > 40 and written.height >= 30  # the legend panel sits right of the image
    overlay = written.convert("RGB").crop((0, 0, 40, 30))
    assert overlay.tobytes() != image.tobytes()  # coloured


def test_demo_cli_loads_a_hub_id_with_a_text_encoder_subfolder(tmp_path, tiny_clip_dir, offline_hub_cache):
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    release = tmp_path / "release"
    DeCLIPVisionModel.from_pretrained(tiny_clip_dir).save_pretrained(release)
    CLIPTextModelWithProjection.from_pretrained(tiny_clip_dir).save_pretrained(release / "text_encoder")
    CLIPTokenizer.from_pretrained(tiny_clip_dir).save_pretrained(release / "text_encoder")
    env = offline_hub_cache("someone/declip-tiny", release)
    Image.new("RGB", (20, 16), (10, 200, 30)).save(tmp_path / "in.png")
    out = tmp_path / "overlay.png"
    completed = subprocess.run(
        [sys.executable, "-m", "declip_hf.segmentation.segment", str(tmp_path / "in.png"), "--labels", "grass,sky",
         "--out", str(out),
         "--model", "someone/declip-tiny", "--shorter-side", "16", "--window", "16", "--stride", "8"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "Wrote" in completed.stdout and Image.open(out).width > 20


# --------------------------------------------------------------------------------------------------------------------
# Refusals: partly random towers, settings that leave pixels unscored, non-finite scores, ambiguous class lists,
# unusable images (issue 8, §2.3, §2.5, §2.7, §4)
# --------------------------------------------------------------------------------------------------------------------


def expect_cli_error(main, argv, capsys) -> str:
    """Run a CLI that must refuse `argv`: exit status 2 and exactly one `error: ...` line, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    return errors[0]


def save_release(folder, tiny_clip_dir):
    """A DeCLIP release layout: the vision tower at the root, the CLIP text tower and tokenizer in text_encoder/."""
    DeCLIPVisionModel.from_pretrained(tiny_clip_dir).save_pretrained(folder)
    CLIPTextModelWithProjection.from_pretrained(tiny_clip_dir).save_pretrained(folder / "text_encoder")
    CLIPTokenizer.from_pretrained(tiny_clip_dir).save_pretrained(folder / "text_encoder")
    return folder


def test_towers_lacking_weights_are_errors_and_a_full_load_is_quiet(tmp_path, tiny_clip_dir, tiny_dinov2_dir, capfd):
    from safetensors.torch import save_file

    release = save_release(tmp_path / "release", tiny_clip_dir)
    capfd.readouterr()
    DeCLIPSegmenter.from_pretrained(release)
    DeCLIPSegmenter.from_pretrained(tiny_clip_dir)  # the other tower's weights are expected, and not reported
    assert "UNEXPECTED" not in capfd.readouterr().err

    # A DINOv2 folder has no CLIP vision weights: refused, even with a valid text tower.
    # (DeCLIPVisionModel.from_pretrained may itself refuse the non-CLIP config first, with its own message.)
    with pytest.raises(ValueError, match=r"(?i)lacks \d+ weight|dinov2"):
        DeCLIPSegmenter.from_pretrained(tiny_dinov2_dir, text_model=str(tiny_clip_dir))
    # Safetensors holding no tensors, on either side.
    empty_text = save_release(tmp_path / "empty_text", tiny_clip_dir)
    save_file({}, empty_text / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"text tower .*text_encoder' lacks \d+ weight.*text_model="):
        DeCLIPSegmenter.from_pretrained(empty_text)
    empty_vision = save_release(tmp_path / "empty_vision", tiny_clip_dir)
    save_file({}, empty_vision / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"(?i)(lacks|missing).*weight"):
        DeCLIPSegmenter.from_pretrained(empty_vision)
    # A non-CLIP text folder.
    with pytest.raises(ValueError, match="no CLIP text tower"):
        DeCLIPSegmenter.from_pretrained(tiny_clip_dir, text_model=str(tiny_dinov2_dir))


def test_text_tower_and_tokenizer_of_another_clip_are_refused(tmp_path, tiny_clip_dir):
    from declip_hf.models.tiny import tiny_clip_config, tiny_clip_tokenizer

    other = tmp_path / "other_clip"
    CLIPModel(tiny_clip_config(projection_dim=16)).save_pretrained(other)
    tiny_clip_tokenizer().save_pretrained(other)
    with pytest.raises(ValueError, match="projects to 24 dimensions but the text tower to 16"):
        DeCLIPSegmenter.from_pretrained(tiny_clip_dir, text_model=str(other))
    # A tokenizer with more tokens than the text tower embeds would fail (or read garbage) at the first prompt.
    release = save_release(tmp_path / "release", tiny_clip_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip_dir)
    tokenizer.add_tokens(["<an-extra-token>"])
    tokenizer.save_pretrained(release / "text_encoder")
    with pytest.raises(ValueError, match=r"tokenizer of .* has \d+ tokens but its text tower embeds only"):
        DeCLIPSegmenter.from_pretrained(release)


def test_settings_that_leave_pixels_unscored_are_refused(segmenter):
    image = torch.rand(3, 40, 40)
    with pytest.raises(ValueError, match=r"stride \(32\) is larger than window \(16\)"):
        segmenter([image], ["a", "b"], shorter_side=40, window=16, stride=32)
    with pytest.raises(ValueError, match="stride <= window"):
        sliding_windows(40, 40, 16, 32)
    for logit_scale in (math.nan, math.inf, -1.0, 0.0):
        with pytest.raises(ValueError, match="logit_scale must be a finite positive number"):
            segmenter([image], ["a", "b"], shorter_side=40, window=16, stride=8, logit_scale=logit_scale)
    for settings in ({"window": 0, "stride": 0}, {"shorter_side": 0}, {"window": 16.5}):
        with pytest.raises(ValueError, match="must be a positive integer"):
            segmenter([image], ["a", "b"], **{"shorter_side": 40, "window": 16, "stride": 8, **settings})
    with pytest.raises(ValueError, match=r"background_threshold must lie in \[0, 1\]"):
        segmenter([image], ["a", "b"], shorter_side=40, window=16, stride=8, background_threshold=1.5)


class NaNFeatureModel(PixelFeatureModel):
    """A vision model whose weights went NaN: every dense feature is NaN."""

    def get_dense_features(self, pixel_values):
        return DeCLIPDenseOutput(dense_embeds=torch.full_like(pixel_values, math.nan), context_features=())


def test_non_finite_scores_are_an_error_not_a_label_map():
    classes = ClassEmbeddings(name_embeds=torch.eye(3), name_to_class=torch.tensor([0, 1, 2]))
    settings = {"shorter_side": 4, "window": 4, "stride": 2}
    broken = DeCLIPSegmenter(NaNFeatureModel(), nn.Identity(), None, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    with pytest.raises(ValueError, match="similarity maps .* NaN or inf"):
        broken([torch.rand(3, 4, 4)], classes, **settings)
    healthy = DeCLIPSegmenter(PixelFeatureModel(), nn.Identity(), None, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    nan_text = ClassEmbeddings(name_embeds=torch.full((3, 3), math.nan), name_to_class=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="class-name embeddings hold NaN or inf"):
        healthy([torch.rand(3, 4, 4)], nan_text, **settings)
    nameless_class = ClassEmbeddings(name_embeds=torch.eye(3), name_to_class=torch.tensor([0, 2, 2]))
    with pytest.raises(ValueError, match="at least one name"):
        healthy([torch.rand(3, 4, 4)], nameless_class, **settings)
    with pytest.raises(ValueError, match="pixels hold NaN"):
        healthy([torch.full((3, 4, 4), math.nan)], classes, **settings)


def test_ambiguous_class_lists_are_refused():
    with pytest.raises(ValueError, match=r"got the string 'cat'; pass \['cat'\] for one class"):
        split_class_names("cat")
    with pytest.raises(ValueError, match=r"unique .*'cat' in classes \[0, 2\]"):
        split_class_names(["cat", "dog", "cat"])  # the second "cat" could never be predicted
    with pytest.raises(ValueError, match=r"'kitty' in classes \[0, 1\]"):
        split_class_names(["cat; kitty", " Kitty "])  # CLIP's tokenizer lower-cases: the same embedding
    with pytest.raises(ValueError, match=r"'cat' in classes \[0, 0\]"):
        split_class_names(["cat; cat"])
    with pytest.raises(ValueError, match="Class 1 is 5: give each class as a string or a list of strings"):
        split_class_names(["cat", 5])
    with pytest.raises(ValueError, match="empty class list"):
        split_class_names([])


def test_image_inputs_are_converted_or_refused_by_layout(segmenter):
    settings = {"shorter_side": 12, "window": 8, "stride": 4, "return_probabilities": True}
    rgb = torch.randint(0, 256, (3, 10, 14), dtype=torch.uint8)
    grey = rgb[0]

    def probabilities(image):
        return segmenter(image, ["a", "b"], **settings).probabilities[0]

    # Grey images are repeated to RGB, whatever the layout; numpy is channels last, torch channels first.
    expected = probabilities(grey.expand(3, -1, -1))
    for image in (grey, grey[None], grey.numpy(), grey.numpy()[..., None], Image.fromarray(grey.numpy())):
        torch.testing.assert_close(probabilities(image), expected)
    torch.testing.assert_close(probabilities(rgb.permute(1, 2, 0).numpy()), probabilities(rgb))
    assert segmenter(torch.rand(3, 1, 60), ["a", "b"], **settings).label_maps[0].shape == (1, 60)  # a thin strip

    refusals = [
        ([], "no images"),
        ([Image.new("RGB", (0, 5))], "Image 0: The image has no pixels"),
        ([rgb, torch.rand(3, 0, 4)], "Image 1: The image has no pixels"),
        ([np.zeros((10, 14, 4), dtype=np.uint8)], r"Image 0: .*\(H, W, 3\) or \(H, W\), got \(10, 14, 4\)"),
        ([torch.rand(4, 10, 14)], r"Image 0: .*\(3, H, W\) or \(H, W\), got \(4, 10, 14\)"),
        ([rgb.float()], r"Float pixels must lie in \[0, 1\].*divide 0-255 values by 255"),
        ([rgb.long()], "uint8 .* or float .* got dtype torch.int64"),
        ([np.zeros((10, 14, 3), dtype=np.uint16)], "got dtype uint16"),
        (["street.jpg"], "Expected a PIL image, numpy array or torch tensor, got str"),
    ]
    for images, message in refusals:
        with pytest.raises(ValueError, match=message):
            segmenter(images, ["a", "b"], **settings)


# --------------------------------------------------------------------------------------------------------------------
# The demo CLI's conventions (issue 8, §5)
# --------------------------------------------------------------------------------------------------------------------


def test_demo_cli_help_shows_defaults_and_refuses_abbreviations_and_a_missing_model(capsys):
    with pytest.raises(SystemExit):
        segment_main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines to the terminal width
    assert "(default: 336)" in help_text and "(default: 40.0)" in help_text
    assert "declip-segment street.jpg" in help_text  # the docstring's layout is kept
    with pytest.raises(SystemExit) as exit_info:
        segment_main(["in.png", "--labels", "a,b", "--model", "m", "--stri", "8"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --stri" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        segment_main(["in.png", "--labels", "a,b"])  # no unverifiable default Hub id
    assert exit_info.value.code == 2 and "required: --model" in capsys.readouterr().err


def test_demo_cli_user_errors_are_one_line_before_the_model_loads(tmp_path, tiny_clip_dir, capsys, monkeypatch):
    image = tmp_path / "in.png"
    Image.new("RGB", (20, 16)).save(image)
    (tmp_path / "text.jpg").write_text("not an image")

    def no_model_load(args):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("declip_hf.segmentation.segment.load_segmenter", no_model_load)
    common = ["--model", str(tiny_clip_dir), "--out", str(tmp_path / "out.png")]
    refusals = [
        ([str(tmp_path / "nope.jpg"), "--labels", "a,b"], r"Cannot read the image '.*nope\.jpg': .*No such file"),
        ([str(tmp_path / "text.jpg"), "--labels", "a,b"], r"Cannot read the image '.*text\.jpg'"),
        ([str(image), "--labels", "a,b", "--window", "16", "--stride", "32"], r"--stride \(32\) is larger than --window"),
        ([str(image), "--labels", "a,b", "--logit-scale", "nan"], "--logit-scale must be a finite positive number"),
        ([str(image), "--labels", "cat,dog,cat"], r"'cat' in classes \[0, 2\]"),
        ([str(image), "--labels", " , "], "empty class list"),
        ([str(image), "--labels", "a,b", "--min-probability", "2"], r"--min-probability must lie in \[0, 1\]"),
        ([str(image), "--labels", "a,b", "--windows-per-batch", "0"], "--windows-per-batch must be a positive"),
        ([str(image), "--labels", "a,b", "--device", "gpu0"], "--device 'gpu0' is not a torch device"),
    ]
    for argv, message in refusals:
        line = expect_cli_error(segment_main, argv + common, capsys)
        assert line.startswith("error: ") and re.search(message, line), line
    for out, message in ((tmp_path / "missing" / "o.png", "not a writable folder"), (tmp_path / "o.txt", "PIL")):
        line = expect_cli_error(segment_main, [str(image), "--labels", "a,b", "--model", "m", "--out", str(out)],
                                capsys)
        assert message in line


def test_demo_cli_refuses_a_dinov2_model_in_one_line(tmp_path, tiny_dinov2_dir, capsys):
    Image.new("RGB", (20, 16)).save(tmp_path / "in.png")
    line = expect_cli_error(
        segment_main,
        [str(tmp_path / "in.png"), "--labels", "a,b", "--model", str(tiny_dinov2_dir), "--out", str(tmp_path / "o.png")],
        capsys,
    )
    assert line.startswith("error: ") and "dinov2" in line.lower(), line


# --------------------------------------------------------------------------------------------------------------------
# The fast path gives the results of a plain computation (benchmarks/segmentation.py measures its speed)
# --------------------------------------------------------------------------------------------------------------------


def reference_segmentation(segmenter, image, classes, shorter_side, window, stride, logit_scale, threshold):
    """SCLIP-style slide inference written out plainly: one window at a time, a new tensor at every step, and the
    max over each class's names as a loop. Returns (label map, class probabilities)."""
    height, width = image.shape[-2:]
    resized = F.interpolate(image[None], size=resized_shape(height, width, shorter_side), mode="bilinear",
                            align_corners=False)
    resized = (resized - segmenter.image_mean) / segmenter.image_std
    num_names = len(classes.name_embeds)
    summed = torch.zeros(1, num_names, *resized.shape[-2:])
    count = torch.zeros(resized.shape[-2:])
    patch = segmenter.vision_model.patch_size
    for y1, y2, x1, x2 in sliding_windows(*resized.shape[-2:], window, stride):
        crop = resized[:, :, y1:y2, x1:x2]
        left, right, top, bottom = patch_padding(y2 - y1, x2 - x1, patch)
        padded = F.pad(crop, (left, right, top, bottom))
        dense = segmenter.vision_model.get_dense_features(padded).dense_embeds
        cosine = torch.einsum("ndhw,qd->nqhw", dense, classes.name_embeds)
        cosine = F.interpolate(cosine, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        summed[:, :, y1:y2, x1:x2] = summed[:, :, y1:y2, x1:x2] + cosine[:, :, top : top + y2 - y1, left : left + x2 - x1]
        count[y1:y2, x1:x2] = count[y1:y2, x1:x2] + 1
    averaged = F.interpolate(summed / count, size=(height, width), mode="bilinear", align_corners=False)[0]
    name_probs = torch.softmax(averaged * logit_scale, dim=0)
    class_probs = torch.stack([
        name_probs[classes.name_to_class == index].max(dim=0).values for index in range(classes.num_classes)
    ])
    max_probs, labels = class_probs.max(dim=0)
    if threshold is not None:
        labels = torch.where(max_probs < threshold, 0, labels)
    return labels, class_probs


@pytest.mark.parametrize("name_to_class", [[0, 1, 2, 3], [0, 2, 1, 1, 3, 0], [1, 0, 2, 3]], ids=["one-name", "synonyms", "permuted"])
@pytest.mark.parametrize("threshold", [None, 0.3])
def test_segmenter_matches_a_plain_reference_computation(segmenter, name_to_class, threshold):
    generator = torch.Generator().manual_seed(len(name_to_class))
    classes = ClassEmbeddings(
        name_embeds=F.normalize(torch.randn(len(name_to_class), 24, generator=generator), dim=-1),
        name_to_class=torch.tensor(name_to_class),
    )
    images = [torch.rand(3, 29, 41, generator=generator), torch.rand(3, 29, 41, generator=generator),
              torch.rand(3, 37, 23, generator=generator)]
    settings = dict(shorter_side=36, window=20, stride=12, logit_scale=40.0)
    # One image and one window per model call, as in the reference: the model's own batching moves its features by
    # float rounding, which the logit scale lifts to ~1e-6 (the batched calls are compared in the test above).
    outputs = [segmenter([image], classes, background_threshold=threshold, return_probabilities=True,
                         windows_per_batch=1, **settings) for image in images]
    with torch.no_grad():
        for image, output in zip(images, outputs):
            labels, probabilities = output.label_maps[0], output.probabilities[0]
            expected_labels, expected_probs = reference_segmentation(segmenter, image, classes, threshold=threshold,
                                                                     **settings)
            torch.testing.assert_close(probabilities, expected_probs, atol=1e-6, rtol=0)
            assert torch.equal(labels, expected_labels)
            if threshold is not None:
                assert (labels == 0).any() and (labels != 0).any()  # the threshold decided some pixels


def test_a_refinement_that_returns_nan_is_an_error_not_a_label_map(segmenter):
    def broken_refine(image, similarities):
        return torch.full_like(similarities, math.nan)

    with pytest.raises(ValueError, match="class probabilities of image 0 hold NaN"):
        segmenter([torch.rand(3, 20, 20)], ["a", "b"], shorter_side=20, window=16, stride=8, refine=broken_refine)


def test_a_refinement_output_is_not_overwritten(segmenter):
    kept = {}

    def keeping_refine(image, similarities):
        kept["maps"] = similarities.clone()
        kept["copy"] = kept["maps"].clone()
        return kept["maps"]

    segmenter([torch.rand(3, 20, 20)], ["a", "b"], shorter_side=20, window=16, stride=8, refine=keeping_refine)
    assert torch.equal(kept["maps"], kept["copy"])  # the logit scale was applied to a copy
