"""The torch-free ClinRaGen runtime: onnxruntime + tokenizers + numpy.

`model.export` writes `<model dir>/onnx/` (prefix graph, decoder graph with KV cache, token
embeddings, manifest); this package reads it, checks it belongs to the model beside it, and
serves the pipeline's `Predictor` protocol. Importing it never imports torch or transformers.
"""

from clinragen_fhir.inference.errors import InputTooLong, ModelUnavailable
from clinragen_fhir.inference.fallback import ModelOrBaseline, build_predictor
from clinragen_fhir.inference.predictor import OnnxPredictor
from clinragen_fhir.inference.runtime import OnnxModel

__all__ = ["InputTooLong", "ModelOrBaseline", "ModelUnavailable", "OnnxModel", "OnnxPredictor",
           "build_predictor"]
