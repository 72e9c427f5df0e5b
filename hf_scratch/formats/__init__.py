"""Checkpoint formats other than the diffusers folder layout."""
