"""The Hugging Face Hub side of DeCLIP: releasing a trained run (`declip-release`) with its model card and demo Space,
and converting open_clip / EVA-CLIP checkpoints (`declip-convert`). Modules are imported on use: the Space needs
Gradio and the figures matplotlib."""
