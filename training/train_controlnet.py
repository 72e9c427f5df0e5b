"""`accelerate launch training/train_controlnet.py ...`: the entry point of `hf_scratch.training.train_controlnet`,
which the wheel carries (so `accelerate launch -m hf_scratch.training.train_controlnet ...` runs the same)."""

from hf_scratch.training.train_controlnet import main, parse_args

if __name__ == "__main__":
    main(parse_args())
