"""Checkpoint readers, manifests, downloads and LoRA merging (the modules import torch; this one does not)."""

LAYOUTS = ("original", "diffusers")  # the folder layouts of the base model: Wan's own, or Diffusers'
