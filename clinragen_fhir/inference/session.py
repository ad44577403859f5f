"""onnxruntime sessions: provider choice (CUDA, else CPU) and thread settings.

onnxruntime is imported here only, so a missing or broken install is one clear error.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from clinragen_fhir.inference.errors import ModelUnavailable

log = logging.getLogger(__name__)
Provider = Literal["auto", "cuda", "cpu"]
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def providers_for(preference: Provider, available: list[str] | None = None) -> list[str]:
    """The providers to ask for, best first; CPU is always last so a session always opens."""
    import onnxruntime as ort

    available = list(ort.get_available_providers()) if available is None else available
    if preference == "cpu":
        return [CPU]
    if preference == "cuda" and CUDA not in available:
        log.warning("CUDA requested but onnxruntime has no CUDAExecutionProvider "
                    "(install onnxruntime-gpu instead of onnxruntime); using CPU")
    return [CUDA, CPU] if CUDA in available else [CPU]


def open_session(path: Path, preference: Provider = "auto", threads: int = 0) -> Any:
    """An InferenceSession; `threads` > 0 fixes intra-op threads (one worker process per core
    group), 0 lets onnxruntime use every core."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads > 0:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # warnings about unused initializers etc. are noise here
    try:
        return ort.InferenceSession(str(path), sess_options=opts,
                                    providers=providers_for(preference))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        raise ModelUnavailable(path, f"onnxruntime cannot load it ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:300]})") from exc


def provider_in_use(session: Any) -> str:
    return str(session.get_providers()[0])
