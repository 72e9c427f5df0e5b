"""`accelerate launch training/train_clip.py ...`: the entry point of `hf_scratch.training.train_clip`, which the
wheel carries (so `accelerate launch -m hf_scratch.training.train_clip ...` runs the same)."""

from hf_scratch.training.train_clip import main, parse_args

if __name__ == "__main__":
    main(parse_args())
