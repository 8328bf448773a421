import torch

from declip_hf import DeCLIPVisionModel


def test_tiny_checkpoint_loads_and_gives_dense_features(tiny_clip_dir):
    model = DeCLIPVisionModel.from_pretrained(tiny_clip_dir)
    dense = model.get_dense_features(torch.randn(1, 3, 32, 32)).dense_embeds
    assert dense.shape == (1, 24, 8, 8)
