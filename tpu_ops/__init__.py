"""Accelerator runtime for stagediff: torchax/JAX compilation of torch modules.

Knows nothing about prompts, stores or model families: it takes torch modules and tensors.
"""
