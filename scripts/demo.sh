#!/usr/bin/env bash
# The main job, on a fresh machine: set up the environment, then run the offline end-to-end demo
# (corpus -> MiniLM + PCA-32 latents -> tokens -> train an RWKV-7 denoiser from scratch -> sample -> evaluate).
source "$(dirname "$0")/_env.sh"
exec diffrwkv demo "$@"
