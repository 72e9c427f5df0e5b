"""The submodels: VAE, CLIP text (and vision) encoder, U-Net, and the ControlNet that steers the U-Net. Each file
holds one model."""
