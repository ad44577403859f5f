"""Predictors: the knowledge-rule baseline now, the ONNX model later."""
