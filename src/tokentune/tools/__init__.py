"""The tools layer: bench, measure, export, ONNX, torch.export, hub, VTAB preparation, pictures, demos."""
