"""Run emoji-bench on a pipeline trained from scratch on the emoji data (`hf_scratch.evaluation`); as `hf-scratch eval`.

python training/evaluate.py --model PIPELINE_DIR --clip JUDGE_CLIP_DIR --data EMOJI_DATA_DIR --out OUT_DIR
"""

import sys

from hf_scratch.cli import eval_main

if __name__ == "__main__":
    sys.exit(eval_main())
