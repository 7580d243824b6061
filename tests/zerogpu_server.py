"""Serve the real app (build_demo on the tiny model) under the `spaces` stand-in of tests/zerogpu_spaces.

Run as its own process by tests/test_zerogpu.py: ``python tests/zerogpu_server.py PORT``. One torch
thread, set before anything runs: an OpenMP pool that was used before a fork is not usable in the child.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "zerogpu_spaces"), os.path.dirname(HERE)]

import spaces  # noqa: E402,F401  (the stand-in; app.py imports it too, before torch, as on a Space)
import torch  # noqa: E402

torch.set_num_threads(1)
torch.set_num_interop_threads(1)

from app import build_demo  # noqa: E402

if __name__ == "__main__":
    demo = build_demo("tiny")
    demo.launch(server_name="127.0.0.1", server_port=int(sys.argv[1]), quiet=True, **demo.launch_options)
