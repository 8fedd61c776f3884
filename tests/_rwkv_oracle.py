"""Run BlinkDL's ``rwkv`` package (RWKV_x070, "cpu fp32") on a checkpoint: the backbone's correctness oracle.

Run in a subprocess, because the package reads ``RWKV_V7_ON`` at import time and changes global torch settings::

    python tests/_rwkv_oracle.py MODEL.pth IDS.json OUT.pt

OUT.pt holds ``logits`` [T, V] (every position, from the zero state) and ``state`` (the package's state list).
"""

import json
import os
import sys

os.environ["RWKV_V7_ON"] = "1"
os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ["RWKV_CUDA_ON"] = "0"

import torch  # noqa: E402
from rwkv.model import RWKV  # noqa: E402


def main() -> None:
    model_path, ids_path, out_path = sys.argv[1:4]
    ids = json.load(open(ids_path))
    model = RWKV(model=model_path.removesuffix(".pth"), strategy="cpu fp32")
    logits, state = model.forward(ids, None, full_output=True)
    torch.save({"logits": logits.float(), "state": [s.float() for s in state]}, out_path)


if __name__ == "__main__":
    main()
