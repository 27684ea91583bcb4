"""ONNX export: the graph builder, the three forms, activation calibration, the verifier and the runner."""
