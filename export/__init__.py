"""Build time: snapshot I/O, the PyTorch reference, ONNX / GGUF / TensorRT export, the bundle writer."""
