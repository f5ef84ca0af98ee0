"""How many rows one forward pass takes: the token budget of a micro-batch, and the packing every scoring path
(protocol v1's, shared or split, and the next-token face's) cuts its length-sorted rows with."""

from __future__ import annotations

from typing import Sequence

#: Default tokens (padding included) per forward micro-batch on a CPU. Why so few: past ~4k tokens MiniLM's
#: feed-forward activations (tokens x 1536 floats) pass 32 MiB, where glibc's malloc maps fresh pages for
#: every allocation and each one faults in, and below that smaller activations stay in the CPU's caches: on
#: this 2-core CPU 4096 served 1.07x faster than 8192 and 2048 1.12x faster than 4096
#: (``benchmarks/server_throughput.py``, its ``server@N`` path).
MAX_BATCH_TOKENS = 2048
#: Real tokens per pass of the packed causal decoder (:mod:`server_stub.engine.packed_causal`) on a CPU, at most:
#: unpadded, its activations stay in cache at this size. On this 2-core CPU, BBT-shaped requests (64 sequences of
#: ~26 rows) on the 6-layer tiny Llama of ``tests/vllm`` served ~1.3x faster in passes of 512 than in one pass
#: of ~1700 (768 and 1024 were in between).
PACKED_CPU_BATCH_TOKENS = 512
#: The same on a GPU, where a micro-batch should fill the device (not tuned by measurement).
GPU_MAX_BATCH_TOKENS = 8192


def default_max_batch_tokens(device_type: str) -> int:
    return MAX_BATCH_TOKENS if device_type == "cpu" else GPU_MAX_BATCH_TOKENS


def micro_batch_spans(row_len: Sequence[int], max_batch_tokens: int) -> list[tuple[int, int]]:
    """[start, end) spans of rows sorted by length, each with rows × its longest <= ``max_batch_tokens`` (one row
    at least): rows of like length share a micro-batch, so each pads little."""
    spans, start = [], 0
    while start < len(row_len):
        end = start + 1
        while end < len(row_len) and (end - start + 1) * row_len[end] <= max_batch_tokens:
            end += 1
        spans.append((start, end))
        start = end
    return spans


def packed_spans(row_len: Sequence[int], max_batch_tokens: int) -> list[tuple[int, int]]:
    """[start, end) spans of rows, each with at most ``max_batch_tokens`` rows' tokens in all (one row at least):
    for work that pays per real token, not per padded one."""
    spans, start = [], 0
    while start < len(row_len):
        end, total = start + 1, row_len[start]
        while end < len(row_len) and total + row_len[end] <= max_batch_tokens:
            total += row_len[end]
            end += 1
        spans.append((start, end))
        start = end
    return spans
