"""This machine's memory bandwidth, and the decode-speed limit it sets.

    .venv/bin/python -m bench.bandwidth [--mib 1024] [--repeat 5]

Bandwidth: the fastest of `--repeat` numpy copies of a `--mib` MiB float32 array (far larger
than any cache) into a preallocated one, counting the bytes read plus the bytes written; and
the fastest of as many full reads (a sum, which streams the array once). One thread, as a
batch-1 decode step largely is.

The limit: at batch 1 a greedy decode step has to read every weight of the decoder once (and
the KV cache so far), so tokens/s can be at most bandwidth / bytes streamed per token
(`bytes_per_token`, from the ONNX graph's initializers).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def measure_bandwidth(mib: int = 1024, repeat: int = 5) -> dict[str, float]:
    """GB/s (1e9 bytes) of a large copy (read + write counted) and of a large read."""
    n = mib * 1024 * 1024 // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault every page in before timing
    copy, read = float("inf"), float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        np.copyto(dst, src)
        copy = min(copy, time.perf_counter() - t)
        t = time.perf_counter()
        float(src.sum(dtype=np.float32))
        read = min(read, time.perf_counter() - t)
    return {"array_mib": float(mib), "copy_gb_s": 2 * src.nbytes / copy / 1e9,
            "read_gb_s": src.nbytes / read / 1e9}


def graph_weight_bytes(path: Path) -> int:
    """Bytes of every initializer of an ONNX graph (weights, in the stored type; external data
    is not loaded: the sizes come from the shapes)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        count = int(np.prod(init.dims)) if len(init.dims) else 1
        total += count * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
    return total


def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, positions: float) -> float:
    """fp32 keys + values read by one decode step over `positions` cached positions."""
    return 2.0 * n_layers * n_kv_heads * head_dim * 4 * positions


def bytes_per_token(weight_bytes: int, n_layers: int, n_kv_heads: int, head_dim: int,
                    positions: float) -> float:
    return weight_bytes + kv_cache_bytes(n_layers, n_kv_heads, head_dim, positions)


def token_limit(bandwidth_gb_s: float, per_token_bytes: float) -> float:
    """The most decoded tokens per second at batch 1 that the bandwidth allows."""
    return bandwidth_gb_s * 1e9 / per_token_bytes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    print(json.dumps(measure_bandwidth(args.mib, args.repeat)))


if __name__ == "__main__":
    main()
