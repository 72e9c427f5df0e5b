"""The three submodels: VAE, CLIP text (and vision) encoder, U-Net. Each file holds one model."""
