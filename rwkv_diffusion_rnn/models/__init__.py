"""Network definitions: the RWKV-7 backbone (:mod:`.rwkv7`, WKV op in :mod:`.wkv7`) and the denoiser."""

from rwkv_diffusion_rnn.models.rwkv7 import RWKV7, RWKV7Config, RWKV7State

__all__ = ["RWKV7", "RWKV7Config", "RWKV7State"]
