"""Compiling the guided UNet with ``torch.compile``, and counting what dynamo did.

At batch 1 an eager SDXL step on a GPU is bound by kernel launches; a compiled UNet (and CUDA graphs,
``mode="reduce-overhead"``) removes that overhead for every guidance method alike.  The guided call
compiles cleanly because everything it reads from Python stays put between steps: the attention patch
reads a per-layer dict refilled in place and takes SEG's blur as matrices (tensors, so graph inputs; see
``seg_core.attention.BranchPlan``), and the down-block sharing builds its index tensors once per layout.
A new graph is compiled only for a new size or a new set of methods (or layers); sigma, the scales,
the step, the prompt and a request's adapters (seg_core.adapters) reuse the graphs.  The guidance
combination (a few elementwise operations) runs eagerly between UNet calls.
"""

from __future__ import annotations

import torch
import torch._dynamo
from torch._dynamo.utils import counters

#: ``torch.compile`` modes (inductor); "reduce-overhead" adds CUDA graphs where shapes are static.
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

#: Modes that record CUDA graphs (inductor's cudagraph trees).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")

#: Graphs dynamo may keep per compiled function: one per (block shape, branch layout) is needed, and a
#: Compare with four methods at two sizes holds more than dynamo's default of 8.
RECOMPILE_LIMIT = 64


def compile_unet(unet: torch.nn.Module, mode: str | None = None, regional: bool = True, fullgraph: bool = True,
                 dynamic: bool = False, backend: str = "inductor") -> torch.nn.Module:
    """Compile ``unet`` in place with ``torch.compile`` (see ``StableDiffusionXLSEGPipeline.compile``)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"mode must be one of {COMPILE_MODES}, got {mode!r}")
    if mode is not None and backend != "inductor":
        raise ValueError(f"mode {mode!r} is an inductor option; with backend {backend!r} pass mode=None")
    if mode in CUDA_GRAPH_MODES and regional:
        # Each block is then its own compiled call: a call starts a new generation of CUDA graph
        # buffers, so the previous block's output, this block's input, is overwritten (pytorch#160281).
        raise ValueError(f"mode {mode!r} records CUDA graphs per compiled call, and with regional=True every "
                         "transformer block is one, overwriting the previous block's output: use "
                         "regional=False (the whole UNet) with it, or mode 'max-autotune-no-cudagraphs'")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    options = dict(mode=mode, fullgraph=fullgraph, dynamic=dynamic, backend=backend)
    if regional:
        unet.compile_repeated_blocks(**options)  # diffusers: every BasicTransformerBlock
    else:
        unet.compile(**options)
    return unet


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module`` or a module inside it was compiled in place (``nn.Module.compile``, as
    :func:`compile_unet` does, regional or whole)."""
    return any(m._compiled_call_impl is not None for m in module.modules())


def dynamo_counts() -> dict[str, int]:
    """Dynamo's running totals in this process: graphs compiled and graph breaks."""
    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def counts_since(before: dict[str, int]) -> dict[str, int]:
    """What dynamo did since ``before`` (a :func:`dynamo_counts`): ``recompiles`` are the graphs compiled
    since then, which after a warm-up call of the same size and methods should be none."""
    now = dynamo_counts()
    return {"recompiles": now["graphs"] - before["graphs"], "graph_breaks": now["graph_breaks"] - before["graph_breaks"]}
