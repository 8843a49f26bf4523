"""The process's own memory on a CPU: how freed tensors go back to the operating system.

glibc's malloc serves a request of at least its mmap threshold with a fresh mapping, which
`free` unmaps (the memory leaves the process at once), and smaller ones from its heap, which it
keeps. The threshold starts at 128 KiB but moves: each freed mapping raises it to that size, up
to 32 MiB. A step of a real model frees many tensors of a few to 32 MiB (a chunk of the LM head's
logits, of the MLP's activations, a layer's hidden states), so after the first of them they all
come from the heap, and what the backward frees stays in the process, in pieces the next phase's
differently sized tensors rarely fit: the process's peak grows by gigabytes above what is ever
alive (bench/memory.py measures it; docs/benchmarks.md has the numbers).
Fixing the threshold (`mallopt(M_MMAP_THRESHOLD)`, which also stops it moving) hands every tensor
of that size or more back when it is freed, for the price of a page fault per page on the next
allocation. CUDA's caching allocator has its own pool: nothing here applies to GPU memory.
"""

from __future__ import annotations

import ctypes

import torch

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
AUTO_THRESHOLD = 1 << 20


def large_vocabulary(model) -> bool:
    """65,536 tokens or more (a real LLM's: Qwen2's 151,936), where the automatic memory choices
    (logprob_chunk_size -1, mlp_activations auto) turn on; the small models of tests and the demo
    stay below it."""
    return (getattr(getattr(model, "config", None), "vocab_size", 0) or 0) >= 65536


def mmap_threshold(cfg, model, device: torch.device) -> int:
    """The threshold the config asks for, in bytes (config key malloc_mmap_threshold; -1: 1 MiB on
    a CPU for a large vocabulary, where steps free tensors of many megabytes; 0: glibc's own)."""
    size = cfg.malloc_mmap_threshold
    if size >= 0:
        return size
    return AUTO_THRESHOLD if device.type == "cpu" and large_vocabulary(model) else 0


def configure(cfg, model, device: torch.device) -> int:
    """Sets glibc's mmap threshold for this process as the config asks; returns the threshold set
    (0: none). Not glibc (macOS, musl): nothing to set, 0."""
    size = mmap_threshold(cfg, model, device)
    return size if size and set_mmap_threshold(size) else 0


def set_mmap_threshold(size: int) -> bool:
    """mallopt(M_MMAP_THRESHOLD, size); whether glibc took it."""
    mallopt = _glibc("mallopt")
    return mallopt is not None and mallopt(M_MMAP_THRESHOLD, ctypes.c_int(size)) == 1


def trim() -> None:
    """malloc_trim(0): hand the heap's free memory back to the system now."""
    malloc_trim = _glibc("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def _glibc(name: str):
    """glibc's function `name`, or None where the C library is not glibc (macOS, musl)."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None
