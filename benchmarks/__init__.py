"""Side-by-side benchmarks of hf-scratch against diffusers: `python -m benchmarks --help`.

Each case builds our model and diffusers' on the same weights and inputs, times them interleaved in one process, and
reports medians and the ratio ours / diffusers in BENCHMARKS.md and a JSON file. See `benchmarks/run.py`.
"""
