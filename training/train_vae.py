"""`accelerate launch training/train_vae.py ...`: the entry point of `hf_scratch.training.train_vae`, which the
wheel carries (so `accelerate launch -m hf_scratch.training.train_vae ...` runs the same)."""

from hf_scratch.training.train_vae import main, parse_args

if __name__ == "__main__":
    main(parse_args())
