"""Export trained checkpoints to other frameworks: PyTorch (safetensors), ONNX, StableHLO."""
