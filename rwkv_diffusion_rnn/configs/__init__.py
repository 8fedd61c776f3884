"""Hydra configs (package, so Hydra finds them when train_rwkv is imported as a module)."""
