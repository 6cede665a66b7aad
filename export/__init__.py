"""MMAP export (installed as `mmap_export`): checkpoint -> model bundle (ONNX, fp16, int8, TensorRT)."""
