"""DiffRwkv: a diffusion denoiser on an RWKV-7 backbone for paired text and 32-d sentence latents.

Public API::

    from rwkv_diffusion_rnn import DiffRwkv
    model = DiffRwkv.from_pretrained("outputs/demo/run")          # a trained checkpoint (or a saved folder)
    texts = model.decode(model.embed(["A dog runs on the beach."]))  # text -> the data's latent -> text
    z = model.encode(["A dog runs."])                              # the model's own text -> latent, [B, 32]

    from rwkv_diffusion_rnn import load_rwkv_model, load_tokenizer
    model = load_rwkv_model("path/to/rwkv7-g1.pth")          # RWKV7, BlinkDL's parameter names
    tok = load_tokenizer("BlinkDL/rwkv7-g1")                  # RWKV World vocabulary, offline
    logits = model(torch.tensor([tok.encode("A dog runs.")]))  # [B, T, V]
"""

from rwkv_diffusion_rnn.errors import DiffRwkvError
from rwkv_diffusion_rnn.tokenizer import EOT_ID, MASK_ID, PAD_ID, load_tokenizer

__all__ = ["DiffRwkv", "DiffRwkvError", "EOT_ID", "MASK_ID", "PAD_ID", "load_rwkv_model", "load_tokenizer"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: importing the package (e.g. for the tokenizer) does not import torch until a model is needed.
    if name == "DiffRwkv":
        from rwkv_diffusion_rnn.api import DiffRwkv

        return DiffRwkv
    if name == "load_rwkv_model":
        from rwkv_diffusion_rnn.pretrained_rwkv import load_rwkv_model

        return load_rwkv_model
    raise AttributeError(name)
