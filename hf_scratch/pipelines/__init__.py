"""Text-to-image and image-to-image pipelines built on our submodels and any diffusers-style scheduler."""
