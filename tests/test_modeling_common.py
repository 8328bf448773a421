"""transformers' common model checks, run on `DeCLIPVisionModel` the way transformers tests `CLIPVisionModel`.

Written after transformers' `ModelTesterMixin` (tests/test_modeling_common.py in its sdist) and its
`CLIPVisionModelTest`, with the same tiny tester config (image 30, patch 2, hidden 32, 2 layers, 4 heads,
intermediate 37), so that the class keeps behaving like a transformers model: save/load round trip, hidden states and
attentions, `return_dict`, SDPA vs eager, weight initialisation, gradient checkpointing, `torch.compile`, and
dtype/device_map loading. Each check also covers DeCLIP's own entry points (`get_image_features`,
`get_dense_features`) where the mixin would only see `forward`.

One mixin check deliberately does not hold: `test_model_weights_reload_no_missing_tied_weights` expects
`from_pretrained` of a folder with no weights to load a random model and list every parameter as missing.
`DeCLIPVisionModel.from_pretrained` refuses such a folder instead, since a random model would silently give wrong
features; the refusal is tested below.
"""

import inspect

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, CLIPVisionModelWithProjection
from transformers.modeling_outputs import BaseModelOutputWithPooling

from declip_hf import DeCLIPCheckpointError, DeCLIPVisionConfig, DeCLIPVisionModel

# transformers' CLIPVisionModelTester, with DeCLIP's odd projection size.
TESTER = dict(
    image_size=30, patch_size=2, num_channels=3, hidden_size=32, projection_dim=24, num_hidden_layers=2,
    num_attention_heads=4, intermediate_size=37, initializer_range=0.02,
)
BATCH_SIZE = 3
SEQUENCE_LENGTH = (TESTER["image_size"] // TESTER["patch_size"]) ** 2 + 1  # patches + CLS


def tiny_config(**overrides) -> DeCLIPVisionConfig:
    return DeCLIPVisionConfig(**{**TESTER, "decoupled_attention": "csa", **overrides})


def tiny_model(seed: int = 0, **config_overrides) -> DeCLIPVisionModel:
    torch.manual_seed(seed)
    return DeCLIPVisionModel(tiny_config(**config_overrides)).eval()


def pixels(batch_size: int = BATCH_SIZE, seed: int = 1) -> torch.Tensor:
    side = TESTER["image_size"]
    return torch.randn(batch_size, 3, side, side, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("common_declip")
    tiny_model().save_pretrained(path)
    return path


def all_outputs(model: DeCLIPVisionModel, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor the model's public entry points return, by name."""
    with torch.no_grad():
        output = model(pixel_values)
        dense = model.get_dense_features(pixel_values)
        return {
            "last_hidden_state": output.last_hidden_state,
            "pooler_output": output.pooler_output,
            "image_embeds": model.get_image_features(pixel_values).pooler_output,
            "dense_embeds": dense.dense_embeds,
            **{f"context_{index}": feature for index, feature in enumerate(dense.context_features)},
        }


def assert_outputs_close(actual: dict, expected: dict, atol: float = 0.0, rtol: float = 0.0):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=rtol, msg=name)


# --------------------------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(saved_dir):
    model = tiny_model()
    reloaded, info = DeCLIPVisionModel.from_pretrained(saved_dir, output_loading_info=True)
    assert not any(info.values()), info
    assert type(reloaded.config) is DeCLIPVisionConfig
    for name in (*TESTER, "decoupled_attention", "hidden_act", "layer_norm_eps", "initializer_factor"):
        assert getattr(reloaded.config, name) == getattr(model.config, name), name
    reloaded_state = reloaded.state_dict()
    assert reloaded_state.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded_state[name], tensor), name
    assert_outputs_close(all_outputs(reloaded.eval(), pixels()), all_outputs(model, pixels()))


def test_folder_without_weights_is_refused_naming_every_parameter(saved_dir, tmp_path):
    """Where the mixin's `test_model_weights_reload_no_missing_tied_weights` expects a random model whose loading
    report lists every parameter as missing, DeCLIP raises, counting every parameter."""
    (tmp_path / "config.json").write_text((saved_dir / "config.json").read_text())
    save_file({"tensor": torch.tensor([1, 2])}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    parameter_count = len(dict(tiny_model().named_parameters()))
    with pytest.raises(DeCLIPCheckpointError, match=rf"lacks {parameter_count} of the DeCLIP vision model's weights"):
        DeCLIPVisionModel.from_pretrained(tmp_path)


def test_config_round_trips_through_every_reader(tmp_path):
    """transformers' ConfigTester: to_json_file/from_json_file, save_pretrained/from_pretrained and AutoConfig give
    the same config back (the plain-CLIP `vision_config` copy in the file never leaks into DeCLIP's config)."""
    config = tiny_config(decoupled_attention="all")
    config.save_pretrained(tmp_path)  # (adds the auto_map of the copied code to the config)
    config.to_json_file(tmp_path / "file.json")
    read_back = {
        "from_json_file": DeCLIPVisionConfig.from_json_file(tmp_path / "file.json"),
        "from_pretrained": DeCLIPVisionConfig.from_pretrained(tmp_path),
        "AutoConfig": AutoConfig.from_pretrained(tmp_path),
    }
    expected = {key: value for key, value in config.to_dict().items() if key != "_name_or_path"}
    for reader, other in read_back.items():
        assert type(other) is DeCLIPVisionConfig, reader
        assert {key: value for key, value in other.to_dict().items() if key != "_name_or_path"} == expected, reader


def test_forward_signature_starts_with_pixel_values():
    assert list(inspect.signature(DeCLIPVisionModel.forward).parameters)[1:2] == ["pixel_values"]
    assert list(inspect.signature(DeCLIPVisionModel.get_image_features).parameters)[1:2] == ["pixel_values"]


# --------------------------------------------------------------------------------------------------------------------
# Hidden states, attentions, return_dict (forward and get_image_features)
# --------------------------------------------------------------------------------------------------------------------

ENTRY_POINTS = {
    "forward": lambda model, pixel_values, **kwargs: model(pixel_values, **kwargs),
    "get_image_features": lambda model, pixel_values, **kwargs: model.get_image_features(pixel_values, **kwargs),
}


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
@pytest.mark.parametrize("requested_by", ["argument", "config"])
def test_hidden_states_output(entry_point, requested_by):
    model = tiny_model(output_hidden_states=requested_by == "config")
    kwargs = {"output_hidden_states": True} if requested_by == "argument" else {}
    with torch.no_grad():
        output = ENTRY_POINTS[entry_point](model, pixels(), **kwargs)
        plain = ENTRY_POINTS[entry_point](model, pixels(), output_hidden_states=False)
    assert len(output.hidden_states) == TESTER["num_hidden_layers"] + 1
    for hidden in output.hidden_states:
        assert hidden.shape == (BATCH_SIZE, SEQUENCE_LENGTH, TESTER["hidden_size"])
    # Asking for hidden states changes nothing else (the mixin's _check_features_ignore_output_hidden_states).
    assert plain.hidden_states is None
    torch.testing.assert_close(output.pooler_output, plain.pooler_output, atol=0, rtol=0)
    torch.testing.assert_close(output.last_hidden_state, plain.last_hidden_state, atol=0, rtol=0)


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
@pytest.mark.parametrize("requested_by", ["argument", "config"])
def test_attentions_output(entry_point, requested_by):
    model = tiny_model(output_attentions=requested_by == "config")
    model.set_attn_implementation("eager")  # SDPA computes no attention weights
    kwargs = {"output_attentions": True} if requested_by == "argument" else {}
    with torch.no_grad():
        output = ENTRY_POINTS[entry_point](model, pixels(), **kwargs)
    assert len(output.attentions) == TESTER["num_hidden_layers"]
    for attention in output.attentions:
        assert attention.shape == (BATCH_SIZE, TESTER["num_attention_heads"], SEQUENCE_LENGTH, SEQUENCE_LENGTH)
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("return_dict", [True, False, None])
def test_get_image_features_output_follows_return_dict(return_dict):
    """transformers 5's `test_get_image_features_output`: a `BaseModelOutputWithPooling` (projected pooler_output),
    or a tuple when `config.return_dict` is False."""
    model = tiny_model()
    if return_dict is not None:
        model.config.return_dict = return_dict
    with torch.no_grad():
        output = model.get_image_features(pixels())
        pooled = model(pixels(), return_dict=True).pooler_output
    expected_embeds = model.visual_projection(pooled)
    if return_dict is False:
        assert isinstance(output, tuple)
        last_hidden_state, image_embeds = output[:2]
    else:
        assert isinstance(output, BaseModelOutputWithPooling)
        last_hidden_state, image_embeds = output.last_hidden_state, output.pooler_output
    assert last_hidden_state.shape == (BATCH_SIZE, SEQUENCE_LENGTH, TESTER["hidden_size"])
    assert image_embeds.shape == (BATCH_SIZE, TESTER["projection_dim"])
    torch.testing.assert_close(image_embeds, expected_embeds, atol=0, rtol=0)


def test_forward_return_dict_false_gives_the_same_tensors_as_a_tuple():
    model = tiny_model()
    with torch.no_grad():
        as_dict = model(pixels(), output_hidden_states=True)
        as_tuple = model(pixels(), output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple())
    for tuple_item, dict_item in zip(as_tuple, as_dict.to_tuple()):
        if isinstance(dict_item, tuple):
            assert all(map(torch.equal, tuple_item, dict_item))
        else:
            assert torch.equal(tuple_item, dict_item)


def test_batching_equivalence():
    """One batch of three gives what three batches of one give (no cross-talk between images)."""
    model = tiny_model()
    batched = all_outputs(model, pixels())
    singles = [all_outputs(model, pixels()[index : index + 1]) for index in range(BATCH_SIZE)]
    for name, tensor in batched.items():
        torch.testing.assert_close(tensor, torch.cat([single[name] for single in singles]), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Attention implementations
# --------------------------------------------------------------------------------------------------------------------


def test_sdpa_is_the_default_and_matches_eager(saved_dir):
    sdpa = DeCLIPVisionModel.from_pretrained(saved_dir).eval()
    eager = DeCLIPVisionModel.from_pretrained(saved_dir, attn_implementation="eager").eval()
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    assert_outputs_close(all_outputs(eager, pixels()), all_outputs(sdpa, pixels()), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------------------------------


def zero_init_config() -> DeCLIPVisionConfig:
    """transformers' `_config_zero_init`: every init range or factor ~0, so weights become 0 and norms 1."""
    return tiny_config(initializer_range=1e-10, initializer_factor=1e-10)


def test_initialization_follows_the_config():
    """The mixin's `test_initialization`: with zeroed init ranges every parameter's mean is 0 or 1, i.e. every module
    (the added visual projection included) is initialised from the config, none left at PyTorch's defaults."""
    model = DeCLIPVisionModel(zero_init_config())
    for name, parameter in model.named_parameters():
        mean = ((parameter.data.mean() * 1e9).round() / 1e9).item()
        assert mean in (0.0, 1.0), f"{name} is not initialised from the config (mean {mean})"


def test_loading_does_not_reinitialise_loaded_weights(saved_dir):
    """The mixin's `test_save_load_fast_init_*` idea: `_init_weights` must skip every weight the checkpoint holds,
    the visual projection included (its init is keyed on the module, see DeCLIPVisionModel._init_weights)."""
    saved = tiny_model().state_dict()
    torch.manual_seed(123)  # a different seed: any re-initialisation would change the weights
    for name, tensor in DeCLIPVisionModel.from_pretrained(saved_dir).state_dict().items():
        assert torch.equal(tensor, saved[name]), name


# --------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing and torch.compile
# --------------------------------------------------------------------------------------------------------------------


def parameter_gradients(model: DeCLIPVisionModel, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of a loss that reads every entry point, by parameter name."""
    model.zero_grad()
    generator = torch.Generator().manual_seed(7)
    dense = model.get_dense_features(pixel_values)
    outputs = [model(pixel_values).pooler_output, model.get_image_features(pixel_values).pooler_output]
    outputs += [dense.dense_embeds, *dense.context_features]
    loss = sum((output * torch.randn(output.shape, generator=generator)).sum() for output in outputs)
    loss.backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    """Every encoder layer is checkpointed, on the ordinary and the dense path, and the gradients do not change."""
    model = tiny_model().train()
    expected = parameter_gradients(model, pixels())
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.is_activation_checkpointing
    checkpointed_calls = []
    for layer in model.encoder.layers:
        checkpoint = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *args, _checkpoint=checkpoint, **kwargs: (
            checkpointed_calls.append(1) or _checkpoint(*args, **kwargs)
        )
    checkpointed = parameter_gradients(model, pixels())
    # forward and get_image_features run every layer, get_dense_features all but the last (its decoupled path).
    assert len(checkpointed_calls) == 3 * TESTER["num_hidden_layers"] - 1
    assert checkpointed.keys() == expected.keys() == dict(model.named_parameters()).keys()
    for name, gradient in expected.items():
        torch.testing.assert_close(checkpointed[name], gradient, atol=1e-6, rtol=1e-5, msg=name)
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing


def test_torch_compile_full_graph_matches_eager_mode():
    """One call through dynamo with `fullgraph=True` (a graph break is an error) for `forward` and the dense path.
    The aot_eager backend checks what we control (tracing, AOT autograd) and costs seconds on a CPU; inductor's
    code generation is PyTorch's and is exercised on a GPU by the test below."""
    model = tiny_model()
    expected = all_outputs(model, pixels())
    torch._dynamo.reset()
    compiled_forward = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled_dense = torch.compile(model.get_dense_features, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        output, dense = compiled_forward(pixels()), compiled_dense(pixels())
    torch.testing.assert_close(output.pooler_output, expected["pooler_output"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense.dense_embeds, expected["dense_embeds"], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor on a GPU needs a GPU")
def test_torch_compile_inductor_on_gpu_matches_eager_mode():
    model = tiny_model().cuda()
    pixel_values = pixels().cuda()
    with torch.no_grad():
        expected = model.get_dense_features(pixel_values).dense_embeds
        torch._dynamo.reset()
        compiled = torch.compile(model.get_dense_features, fullgraph=True)(pixel_values).dense_embeds
    torch.testing.assert_close(compiled, expected, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# dtype and device_map loading
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loads_in_the_requested_dtype(saved_dir, tmp_path, dtype):
    model = DeCLIPVisionModel.from_pretrained(saved_dir, dtype=dtype)
    assert {parameter.dtype for parameter in model.parameters()} == {dtype} and model.dtype == dtype
    # dtype="auto" keeps the dtype the checkpoint was saved in.
    model.save_pretrained(tmp_path)
    assert DeCLIPVisionModel.from_pretrained(tmp_path, dtype="auto").dtype == dtype
    assert DeCLIPVisionModel.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32


def test_loads_with_a_device_map(saved_dir):
    expected = all_outputs(DeCLIPVisionModel.from_pretrained(saved_dir).eval(), pixels())
    for device_map in ("cpu", {"": "cpu"}, "auto"):
        model = DeCLIPVisionModel.from_pretrained(saved_dir, device_map=device_map).eval()
        if not torch.cuda.is_available():
            assert {parameter.device.type for parameter in model.parameters()} == {"cpu"}, device_map
        on_device = {name: tensor.to(model.device) for name, tensor in expected.items()}
        assert_outputs_close(all_outputs(model, pixels().to(model.device)), on_device, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="loading onto a GPU with device_map needs a GPU")
def test_loads_onto_a_gpu_with_a_device_map_in_bfloat16(saved_dir):
    model = DeCLIPVisionModel.from_pretrained(saved_dir, device_map="cuda", dtype=torch.bfloat16).eval()
    assert {parameter.device.type for parameter in model.parameters()} == {"cuda"}
    reference = DeCLIPVisionModel.from_pretrained(saved_dir).eval()
    with torch.no_grad():
        half = model.get_dense_features(pixels().cuda().bfloat16()).dense_embeds
        regions = model.get_region_features(pixels(1).cuda().bfloat16(), [torch.tensor([[0.1, 0.1, 0.8, 0.9]])])
        full = reference.get_dense_features(pixels()).dense_embeds
    assert half.dtype == regions[0].dtype == torch.bfloat16 and regions[0].device.type == "cuda"
    assert torch.nn.functional.cosine_similarity(half.float().cpu(), full, dim=1).min() > 0.99


def test_plain_clip_with_projection_is_the_same_model_after_a_round_trip(saved_dir):
    """The saved folder reads back as transformers' own class with identical outputs (what the mixin's
    save/load checks guarantee for CLIPVisionModelWithProjection itself)."""
    plain = CLIPVisionModelWithProjection.from_pretrained(saved_dir).eval()
    model = tiny_model()
    with torch.no_grad():
        torch.testing.assert_close(plain(pixels()).image_embeds, model.get_image_features(pixels()).pooler_output)
