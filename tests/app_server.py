"""One demo server per test process (tiny model), shared by test_app.py and test_browser.py."""

import functools
import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ARTIFACTS = os.path.join(os.path.dirname(__file__), "artifacts")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@functools.lru_cache(maxsize=None)
def running_demo(limits=None, queue_size=16, adapters=None):
    """(demo, url): the app on the tiny model, served from a thread until the process ends; one server per
    distinct (limits, queue_size, adapters: the path of an adapters.json)."""
    from app import build_demo
    from seg_core.adapters import read_adapter_config

    config = read_adapter_config(adapters) if adapters else None
    demo = build_demo("tiny", limits=limits, queue_size=queue_size, adapters=config)
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                **demo.launch_options)
    return demo, demo.local_url


def library_image(pipe, seed: int, control_image=None, **kwargs):
    """The image of a direct call of the library pipeline (no studio, no app) as an RGB array: what the
    demo must show for the same arguments, pixel for pixel. ``control_image``: an image file, turned into
    the control map by the library's own steps (decode, fit to the output size, Canny)."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    from seg_core.presets import preprocess_control
    from seg_core.studio import load_control_image

    if control_image is not None:
        fitted = ImageOps.fit(load_control_image(control_image), (kwargs["width"], kwargs["height"]), Image.LANCZOS)
        kwargs["image"] = preprocess_control("canny", fitted)
    image = pipe(**kwargs, generator=torch.Generator().manual_seed(seed), output_type="pil").images[0]
    return np.asarray(image.convert("RGB"))


def grid_cells(grid, images, row_labels=None, title="t"):
    """The cells of a sweep grid (an RGB array) laid out as seg_core.studio.labelled_grid lays out ``images``
    ([row][column] arrays): (cells of ``grid``, the same cells of a grid of ``images``). Where the cells are
    is found by drawing the grid twice, once all white and once all black: labels and title never move them."""
    import numpy as np
    from PIL import Image

    from seg_core.studio import labelled_grid

    def draw(rows):
        columns = ["c"] * len(rows[0])
        return np.asarray(labelled_grid([[Image.fromarray(a) for a in row] for row in rows], columns, row_labels, title))

    white = draw([[np.full_like(a, 255) for a in row] for row in images])
    black = draw([[np.zeros_like(a) for a in row] for row in images])
    cells = np.any(white != black, axis=-1)
    expected = draw(images)
    assert grid.shape == expected.shape, (grid.shape, expected.shape)
    return grid[cells], expected[cells]
