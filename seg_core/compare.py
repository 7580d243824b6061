"""Several methods' images from one seed in one denoising loop, with batched UNet calls.

Image k of the batch is guided by ``method_sets[k]`` only (each method applies to its own row; see
``GuidanceMethod.rows``). Every step then makes one UNet call with the rows of all methods (vanilla,
SAG, PAG and SEG: 2 + 2 + 3 + 3 rows with CFG) plus SAG's second call, instead of one pipeline run per
method. The images equal separate runs from the same seed. It pays where UNet calls are bound by kernel
launches (a GPU at batch 1: 0.63x the time of four runs on an H200); where they are compute-bound it
saves nothing, and it cannot time each method on its own. See bench/guidance_cost.py.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch

from .methods import GuidanceMethod


def side_by_side(pipe, method_sets: Sequence[Sequence[GuidanceMethod]], prompt: str = "", seed: int = 0, **kwargs):
    """One image per entry of ``method_sets`` (an empty entry is plain sampling), all from ``seed``.

    ``pipe`` is a StableDiffusionXLSEGPipeline; ``kwargs`` go to its ``__call__`` (sizes, steps,
    ``guidance_scale``, ``output_type``, a control ``image``, ...). Returns the pipeline's images, in the
    order of ``method_sets``. The given method objects are not changed.
    """
    for name in ("num_images_per_prompt", "generator", "guidance_methods", "latents"):
        if name in kwargs:
            raise ValueError(f"side_by_side sets {name} itself; do not pass it")
    if not isinstance(prompt, str):
        raise ValueError(f"side_by_side takes one prompt (a string), got {type(prompt).__name__}")
    if not method_sets:
        raise ValueError("method_sets must name at least one set of methods ([] is plain sampling)")
    methods = []
    for row, method_set in enumerate(method_sets):
        for method in method_set:
            method = copy.copy(method)
            method.rows = (row,)
            methods.append(method)
    # One generator per image, all seeded alike: the same initial (and ancestral) noise as separate runs.
    generators = [torch.Generator("cpu").manual_seed(seed) for _ in method_sets]
    return pipe(prompt, num_images_per_prompt=len(method_sets), generator=generators,
                guidance_methods=methods, **kwargs).images
