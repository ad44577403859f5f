"""What a predictor is and returns (`types`), how a diagnosis list is concluded (`conclude`) and
written as the diagnosis line (`diagnosis_line`), and the knowledge-rule baseline (`rules`).
The ONNX model's predictor is `clinragen_fhir.inference.predictor.OnnxPredictor`."""
