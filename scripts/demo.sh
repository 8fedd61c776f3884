#!/usr/bin/env bash
# The main job, on a fresh machine: set up the environment, then run it.
# Until the offline end-to-end demo lands, the main job is the backbone smoke run (diffrwkv smoke).
source "$(dirname "$0")/_env.sh"
exec diffrwkv smoke "$@"
