"""Training Stable Diffusion from scratch, submodel by submodel, as part of the package (so the wheel carries it).

By concern: `arguments` (the flags every script shares), `data` (local datasets, epoch order, latent cache), `trainer`
(the update loop under Accelerate), `checkpoints` (atomic, verified, pickle-free), `lora` and `cards` (model cards);
the three trainers `train_vae`, `train_clip` and `train_unet`, each runnable as `accelerate launch -m
hf_scratch.training.train_unet ...` or through the thin scripts in the repository's `training/` folder.
"""
