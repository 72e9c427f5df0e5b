"""`accelerate launch training/train_unet.py ...`: the entry point of `hf_scratch.training.train_unet`, which the
wheel carries (so `accelerate launch -m hf_scratch.training.train_unet ...` runs the same)."""

from hf_scratch.training.train_unet import main, parse_args

if __name__ == "__main__":
    main(parse_args())
