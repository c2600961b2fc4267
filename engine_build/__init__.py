"""pocketseg.engine_build: model packages from torch nets (ONNX, fp16 ONNX, checks) and TensorRT engines."""
