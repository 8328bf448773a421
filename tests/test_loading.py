"""Loading Hub-layout CLIP checkpoints, saving, the plain-CLIP drop-in promise, Auto classes and remote code."""

import json
import logging
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    ViTConfig,
    ViTModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from declip_hf import DeCLIPCheckpointError, DeCLIPVisionConfig, DeCLIPVisionModel

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_VISION = dict(
    image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    projection_dim=24,
)


@contextmanager
def transformers_warnings():
    """Collect what transformers logs at WARNING or above (its logger does not propagate to pytest's caplog)."""
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.WARNING)  # so that a quieter verbosity set elsewhere cannot hide a warning
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def hub_key(model_key: str) -> str:
    """Where a DeCLIP parameter lives in a Hub CLIP checkpoint."""
    return model_key if model_key.startswith("visual_projection.") else f"vision_model.{model_key}"


def assert_weights_equal_checkpoint(model: DeCLIPVisionModel, folder: Path):
    checkpoint = load_file(folder / "model.safetensors")
    vision_keys = {key for key in checkpoint if key.startswith(("vision_model.", "visual_projection."))}
    state = model.state_dict()
    assert {hub_key(key) for key in state} == vision_keys
    for key, tensor in state.items():
        assert torch.equal(tensor, checkpoint[hub_key(key)].to(tensor.dtype)), key


def pixels(height: int = 32, width: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def with_projection_dir(tmp_path_factory) -> Path:
    """A CLIPVisionModelWithProjection checkpoint (vision tower and projection only), as on the Hub."""
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("clip_with_projection")
    CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_VISION)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def saved_declip_dir(tmp_path_factory, tiny_clip_dir) -> Path:
    path = tmp_path_factory.mktemp("declip_saved")
    DeCLIPVisionModel.from_pretrained(tiny_clip_dir, decoupled_attention="csa").save_pretrained(path)
    return path


def test_loads_every_vision_weight_of_a_full_clip_checkpoint_quietly(tiny_clip_dir):
    assert any(key.startswith("text_model.") for key in load_file(tiny_clip_dir / "model.safetensors"))
    with transformers_warnings() as warnings:
        model, info = DeCLIPVisionModel.from_pretrained(tiny_clip_dir, output_loading_info=True)
    assert warnings == [], [record.getMessage() for record in warnings]
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    assert model.config.projection_dim == 24 and model.config.decoupled_attention == "qq"
    assert_weights_equal_checkpoint(model, tiny_clip_dir)


def test_loads_every_weight_of_a_vision_with_projection_checkpoint(with_projection_dir):
    with transformers_warnings() as warnings:
        model, info = DeCLIPVisionModel.from_pretrained(with_projection_dir, output_loading_info=True)
    assert warnings == [], [record.getMessage() for record in warnings]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_weights_equal_checkpoint(model, with_projection_dir)


def test_decoupled_attention_overridable_at_load(tiny_clip_dir):
    model = DeCLIPVisionModel.from_pretrained(tiny_clip_dir, decoupled_attention="all")
    assert model.config.decoupled_attention == "all"
    assert len(model.get_dense_features(pixels()).context_features) == 3
    with pytest.raises(ValueError, match="'bad'.*qq, kk, vv, csa, all, vanilla, maskclip"):
        DeCLIPVisionModel.from_pretrained(tiny_clip_dir, decoupled_attention="bad")


def test_save_writes_safetensors_config_and_code_and_reloads_identically(tiny_clip_dir, saved_declip_dir):
    files = {path.name for path in saved_declip_dir.iterdir()}
    assert {"model.safetensors", "config.json"} <= files
    assert not {name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))}
    # The code travels with the weights, so the folder loads with trust_remote_code where declip_hf is absent.
    assert {"configuration_declip.py", "modeling_declip.py", "region_pooling.py"} <= files
    config = json.loads((saved_declip_dir / "config.json").read_text())
    assert config["model_type"] == "declip_vision_model" and config["decoupled_attention"] == "csa"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_declip.DeCLIPVisionConfig",
        "AutoModel": "modeling_declip.DeCLIPVisionModel",
    }
    # One on-disk layout, the Hub's, however the model was made.
    assert_weights_equal_checkpoint(DeCLIPVisionModel.from_pretrained(saved_declip_dir), saved_declip_dir)
    assert load_file(saved_declip_dir / "model.safetensors").keys() == {
        key for key in load_file(tiny_clip_dir / "model.safetensors") if not key.startswith(("text_", "logit_scale"))
    }

    original = DeCLIPVisionModel.from_pretrained(tiny_clip_dir, decoupled_attention="csa")
    reloaded = DeCLIPVisionModel.from_pretrained(saved_declip_dir)
    with torch.no_grad():
        before, after = original.get_dense_features(pixels()), reloaded.get_dense_features(pixels())
        assert torch.equal(before.dense_embeds, after.dense_embeds)
        assert all(map(torch.equal, before.context_features, after.context_features))
        assert torch.equal(original(pixels()).pooler_output, reloaded(pixels()).pooler_output)


def test_saved_folder_is_a_drop_in_plain_clip(saved_declip_dir):
    model = DeCLIPVisionModel.from_pretrained(saved_declip_dir)
    tower, tower_info = CLIPVisionModel.from_pretrained(saved_declip_dir, output_loading_info=True)
    with_projection, projection_info = CLIPVisionModelWithProjection.from_pretrained(
        saved_declip_dir, output_loading_info=True
    )
    assert not tower_info["missing_keys"] and not projection_info["missing_keys"]
    assert not projection_info["unexpected_keys"]

    state = model.state_dict()
    for key, tensor in tower.state_dict().items():
        assert torch.equal(tensor, state[key]), key
    for key, tensor in with_projection.state_dict().items():
        assert torch.equal(tensor, state[key.removeprefix("vision_model.")]), key
    with torch.no_grad():
        output, plain = model(pixels(24, 40), interpolate_pos_encoding=True), tower(pixels(24, 40), interpolate_pos_encoding=True)
        assert torch.equal(output.last_hidden_state, plain.last_hidden_state)
        assert torch.equal(output.pooler_output, plain.pooler_output)
        image_embeds = model.get_image_features(pixels()).pooler_output
        assert torch.equal(image_embeds, with_projection(pixels()).image_embeds)


TYPE_MISMATCH_WARNING = "to instantiate a model of type"


@pytest.mark.parametrize("plain_class", [CLIPVisionModel, CLIPVisionModelWithProjection])
def test_plain_clip_loads_the_saved_folder_without_a_type_mismatch_warning(saved_declip_dir, plain_class):
    """The README promises this load; transformers used to warn it was "not supported and can yield errors"."""
    with transformers_warnings() as warnings:
        model = plain_class.from_pretrained(saved_declip_dir)
    messages = [record.getMessage() for record in warnings]
    assert not [message for message in messages if TYPE_MISMATCH_WARNING in message], messages
    # A plain CLIP config, read from the folder's `vision_config`, the same tower as DeCLIP's top level.
    assert type(model.config) is CLIPVisionConfig and model.config.model_type == "clip_vision_model"
    declip_config = DeCLIPVisionConfig.from_pretrained(saved_declip_dir)
    for name in ("hidden_size", "num_hidden_layers", "image_size", "patch_size", "projection_dim", "hidden_act"):
        assert getattr(model.config, name) == getattr(declip_config, name), name
    assert not hasattr(declip_config, "vision_config")


def test_get_image_features_follows_clip_model_and_config_return_dict(saved_declip_dir):
    """transformers 5's CLIPModel.get_image_features: the forward's output with a projected pooler_output."""
    # Eager attention: SDPA returns no attention weights.
    model = DeCLIPVisionModel.from_pretrained(saved_declip_dir, attn_implementation="eager")
    with torch.no_grad():
        output = model.get_image_features(pixels(), output_hidden_states=True, output_attentions=True)
        plain = model(pixels())
    assert isinstance(output, BaseModelOutputWithPooling)
    assert torch.equal(output.pooler_output, model.visual_projection(plain.pooler_output))
    assert torch.equal(output.last_hidden_state, plain.last_hidden_state)
    assert len(output.hidden_states) == len(output.attentions) + 1 == TINY_VISION["num_hidden_layers"] + 1

    # `from_pretrained(..., return_dict=False)` used to fail with "'tuple' object has no attribute 'pooler_output'".
    tuple_model = DeCLIPVisionModel.from_pretrained(saved_declip_dir, return_dict=False, attn_implementation="eager")
    with torch.no_grad():
        as_tuple = tuple_model.get_image_features(pixels())
        as_dict = tuple_model.get_image_features(pixels(), return_dict=True)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[1], output.pooler_output) and torch.equal(as_dict.pooler_output, output.pooler_output)


def test_refuses_a_config_that_is_not_a_clip_vision_tower(tiny_dinov2_dir, tmp_path):
    torch.manual_seed(0)
    vit_config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    ViTModel(vit_config).save_pretrained(tmp_path / "vit")
    for folder, model_type in ((tiny_dinov2_dir, "dinov2"), (tmp_path / "vit", "vit")):
        message = rf"declares model_type '{model_type}', which is not a CLIP vision tower.*'declip_vision_model', "
        with pytest.raises(DeCLIPCheckpointError, match=message):
            DeCLIPVisionModel.from_pretrained(folder)
        with pytest.raises(DeCLIPCheckpointError, match=message):
            DeCLIPVisionConfig.from_pretrained(folder)
    assert issubclass(DeCLIPCheckpointError, ValueError)


def test_refuses_a_checkpoint_without_vision_weights(saved_declip_dir, tmp_path):
    """An empty safetensors used to load as a silently random model."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((saved_declip_dir / "config.json").read_text())
    save_file({}, empty / "model.safetensors", metadata={"format": "pt"})
    message = r"lacks \d+ of the DeCLIP vision model's weights .*would be random"
    with pytest.raises(DeCLIPCheckpointError, match=message):
        DeCLIPVisionModel.from_pretrained(empty)
    with pytest.raises(DeCLIPCheckpointError, match="lacks"):  # the Auto classes load through the same method
        AutoModel.from_pretrained(empty)


def test_refuses_a_plain_clip_vision_model_checkpoint_without_projection(tmp_path):
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).save_pretrained(tmp_path)
    with pytest.raises(DeCLIPCheckpointError, match=r"visual_projection\.weight.*CLIPVisionModelWithProjection"):
        DeCLIPVisionModel.from_pretrained(tmp_path)


def test_auto_classes_resolve_to_declip(saved_declip_dir):
    assert type(AutoConfig.from_pretrained(saved_declip_dir)) is DeCLIPVisionConfig
    model = AutoModel.from_pretrained(saved_declip_dir)
    assert type(model) is DeCLIPVisionModel and model.config.decoupled_attention == "csa"


# Runs where `declip_hf` cannot be imported: the Auto classes must find the copied code via `auto_map`, both in a
# local folder and behind a Hub id served from the offline cache. Then, with declip_hf back, the Hub id again.
REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["declip_hf"] = None  # any `import declip_hf` now raises ImportError
    folder, hub_id, repo_root, inputs_file, outputs_file = sys.argv[1:]
    try:
        import declip_hf
        raise SystemExit("declip_hf should not be importable here")
    except ImportError:
        pass

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    pixel_values = load_file(inputs_file)["pixel_values"]
    outputs = {}
    for name, source in (("folder", folder), ("hub", hub_id)):
        model = AutoModel.from_pretrained(source, trust_remote_code=True)
        assert type(model).__name__ == "DeCLIPVisionModel", type(model)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        with torch.no_grad():
            dense = model.get_dense_features(pixel_values)
        outputs[f"{name}_dense"] = dense.dense_embeds
        outputs.update({f"{name}_context_{i}": feature for i, feature in enumerate(dense.context_features)})

    del sys.modules["declip_hf"]
    sys.path.insert(0, repo_root)
    from declip_hf import DeCLIPVisionModel

    with torch.no_grad():
        outputs["installed_hub_dense"] = DeCLIPVisionModel.from_pretrained(hub_id).get_dense_features(pixel_values).dense_embeds
    save_file({name: tensor.contiguous() for name, tensor in outputs.items()}, outputs_file)
    """
)


def test_remote_code_and_offline_hub_id_in_a_fresh_process(saved_declip_dir, offline_hub_cache, tmp_path):
    env = offline_hub_cache("org/declip-tiny", saved_declip_dir)
    env.update(PYTHONPATH="", HF_MODULES_CACHE=str(tmp_path / "modules"))
    save_file({"pixel_values": pixels()}, tmp_path / "inputs.safetensors")
    (tmp_path / "remote.py").write_text(REMOTE_CODE_SCRIPT)
    arguments = [saved_declip_dir, "org/declip-tiny", REPO_ROOT, tmp_path / "inputs.safetensors", tmp_path / "out.safetensors"]
    result = subprocess.run(
        [sys.executable, "remote.py", *map(str, arguments)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]

    outputs = load_file(tmp_path / "out.safetensors")
    with torch.no_grad():
        expected = DeCLIPVisionModel.from_pretrained(saved_declip_dir).get_dense_features(pixels())
    for source in ("folder", "hub"):
        assert torch.equal(outputs[f"{source}_dense"], expected.dense_embeds), source
        assert len(expected.context_features) == 2
        for index, feature in enumerate(expected.context_features):
            assert torch.equal(outputs[f"{source}_context_{index}"], feature), source
    assert torch.equal(outputs["installed_hub_dense"], expected.dense_embeds)


def test_loads_in_bfloat16(tiny_clip_dir):
    model = DeCLIPVisionModel.from_pretrained(tiny_clip_dir, dtype=torch.bfloat16)
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    reference = DeCLIPVisionModel.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        half = model.get_dense_features(pixels().to(torch.bfloat16)).dense_embeds
        full = reference.get_dense_features(pixels()).dense_embeds
    assert half.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(half.float(), full, dim=1).min() > 0.99


def test_image_normalisation_reads_the_processor_config_or_falls_back(tiny_clip_dir, tiny_dinov2_dir, tmp_path):
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    from declip_hf.models.loading_utils import image_normalisation

    assert image_normalisation(str(tiny_clip_dir)) == (tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD))
    assert image_normalisation(str(tiny_dinov2_dir), (0.0,) * 3, (1.0,) * 3)[0] == tuple(IMAGENET_DEFAULT_MEAN)
    assert image_normalisation(str(tmp_path), (0.1, 0.2, 0.3), (1.0, 1.0, 1.0)) == ((0.1, 0.2, 0.3), (1.0, 1.0, 1.0))
