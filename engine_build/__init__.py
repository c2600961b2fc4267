"""pocketseg.engine_build: torch -> ONNX export, graph cleanup, fp16 conversion, TensorRT engines."""
