"""The objectives study: which training objective makes the best small latent-diffusion model at equal compute.

Every arm trains the shipped model's U-Net configuration from the same initialisation, data order, steps, batch,
learning rate and EMA (all fixed by the run's seed), on the shipped model's frozen VAE and text encoder with cached
latents (emoji32 v1's, up to commit 6ad70cb, for docs/study.md); only the objective differs. Each run is evaluated
by emoji-bench's metrics (the shipped `emoji32-judge`) at 1/3, 2/3 and the end of training, with the arm's own
sampler at 20 and at 10 steps.

    python training/study.py run                # train and evaluate every run not yet in docs/study.json
    python training/study.py report             # docs/study.md and docs/study.png from docs/study.json

`run` records each finished run in docs/study.json and skips it when re-run; a run cut short resumes from its latest
checkpoint. Two runs train in parallel, one thread each (`--workers`). The verdict names a winner only when it beats
the baseline (A0, ε-prediction with uniform t) by more than the seed spread (max − min over seeds) of either arm.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from study_report import StudyDesign, write_report

from hf_scratch.data.emoji import SPLITS

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "hf_scratch" / "pretrained" / "emoji32"
JUDGE = ROOT / "hf_scratch" / "pretrained" / "emoji32-judge"

BATCH_SIZE = 64
# The shipped U-Net's recipe (training/recipes/emoji32.sh), shortened to the study's budget.
COMMON_FLAGS = [
    "--resolution", "32", "--report_to", "none", "--cache_latents",
    "--block_out_channels", "64", "128", "128", "--layers_per_block", "1", "--cross_attention_levels", "0", "1", "2",
    "--train_batch_size", str(BATCH_SIZE), "--learning_rate", "5e-4", "--lr_scheduler", "cosine",
    "--lr_warmup_steps", "60",
    "--caption_dropout_prob", "0.1", "--use_ema", "--ema_decay", "0.999",
    "--resume_from_checkpoint", "latest", "--checkpoints_total_limit", "1", "--checkpointing_steps", "100",
    "--validation_steps", "100000",
]  # fmt: skip
# Latents scaled to std ≈ 1 (the shipped VAE's scaling_factor): σ_data = 1, EDM2's P_mean −0.4 (for std 0.5) + ln 2.
EDM_FLAGS = ["--objective", "edm", "--sigma_data", "1.0", "--edm_p_mean", "0.29", "--edm_p_std", "1.0"]
FLOW_FLAGS = [
    "--objective",
    "flow_matching",
    "--weighting_scheme",
    "logit_normal",
    "--logit_mean",
    "0",
    "--logit_std",
    "1",
]
ARMS = {
    "A0": ("ε, uniform t", ["--objective", "epsilon"]),
    "A1": ("ε + min-SNR-5 (the shipped recipe)", ["--objective", "epsilon", "--snr_gamma", "5"]),
    "A2": ("v + zero-terminal-SNR + trailing + min-SNR-5",
           ["--objective", "v_prediction", "--rescale_betas_zero_snr", "--snr_gamma", "5"]),
    "A3": ("EDM (σ_data 1, ln σ ~ N(0.29, 1))", EDM_FLAGS),
    "A4": ("flow matching, logit-normal(0, 1)", FLOW_FLAGS),
    "A5": ("the better of A3/A4 + immiscible noise", None),  # decided from A3 and A4's results
}  # fmt: skip
BASELINE = "A0"
SAMPLERS = {"epsilon": "dpm++", "v_prediction": "dpm++", "edm": "edm-dpm++", "flow_matching": "flow-euler"}
STEP_COUNTS = (20, 10)
# The verdict's metric: judge top-5 averaged over the three splits, at the end, 20 steps; lower-is-better FD second.
PRIMARY = "top5"
DESIGN = StudyDesign({arm: description for arm, (description, _) in ARMS.items()}, BASELINE, STEP_COUNTS[0])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("--data", default="runs/data", help="the emoji dataset (`hf-scratch data emoji --out DIR`)")
    parser.add_argument("--runs_dir", default="runs/study")
    parser.add_argument("--results", default="docs/study.json")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--workers", type=int, default=2, help="runs trained at once, one thread each")
    parser.add_argument("--prompts", type=int, default=128, help="prompts per split at the end of training")
    parser.add_argument("--prompts_midway", type=int, default=64, help="prompts per split at 1/3 and 2/3")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--evaluate", help=argparse.SUPPRESS)  # internal: evaluate one run folder
    return parser.parse_args()


# ------------------------------------------------------------------------------------------------------- results
_lock = threading.Lock()


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"runs": {}}


def record(path: Path, key: str, value: dict) -> None:
    """Add one finished run to the results file, atomically (write, then rename)."""
    with _lock:
        results = load_results(path)
        results["runs"][key] = value
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(results, indent=1) + "\n")
        os.replace(partial, path)


def arm_flags(arm: str, results: dict) -> list[str]:
    """The arm's objective flags; A5 takes those of whichever of A3 and A4 scores higher."""
    if ARMS[arm][1] is not None:
        return ARMS[arm][1]
    means = {candidate: primary_score(results, candidate) for candidate in ("A3", "A4")}
    if None in means.values():
        raise RuntimeError("A5 needs finished A3 and A4 runs to choose from; run them first")
    better = max(means, key=means.get)
    return ARMS[better][1] + ["--immiscible_noise"]


def primary_score(results: dict, arm: str) -> float | None:
    """Mean over seeds of the verdict's metric at the last checkpoint, or None when the arm has no finished run."""
    values = [end_point(run)[0] for run in results["runs"].values() if run["arm"] == arm]
    return sum(values) / len(values) if values else None


def end_point(run: dict) -> tuple[float, float]:
    """(mean top-5, mean Fréchet distance) over the splits at the last checkpoint with 20 steps."""
    last = run["checkpoints"][str(max(int(step) for step in run["checkpoints"]))]
    scores = [last[split][f"{STEP_COUNTS[0]}"] for split in SPLITS]
    return (sum(s[PRIMARY] for s in scores) / len(scores), sum(s["frechet_clip"] for s in scores) / len(scores))


# --------------------------------------------------------------------------------------------------------- runs
def train_and_evaluate(args: argparse.Namespace, arm: str, seed: int) -> None:
    key = f"{arm}-s{seed}"
    results_path = Path(args.results)
    if key in load_results(results_path)["runs"]:
        return
    flags = arm_flags(arm, load_results(results_path))
    out = Path(args.runs_dir, key)
    snapshots = [args.steps // 3, 2 * args.steps // 3]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable, str(ROOT / "training" / "train_unet.py"), "--train_data_dir", args.data,
        "--pretrained_model_name_or_path", str(SHIPPED), "--output_dir", str(out), "--seed", str(seed),
        "--max_train_steps", str(args.steps), "--snapshot_steps", *map(str, snapshots), *COMMON_FLAGS, *flags,
    ]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "model_index.json").exists():
        with open(out / "train.out", "a") as log:
            subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    start = time.perf_counter()
    evaluate_command = [sys.executable, __file__, "run", "--evaluate", str(out), "--data", args.data,
                        "--prompts", str(args.prompts), "--prompts_midway", str(args.prompts_midway),
                        "--guidance", str(args.guidance), "--steps", str(args.steps)]  # fmt: skip
    with open(out / "eval.out", "a") as log:
        subprocess.run(evaluate_command, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    evaluation = json.loads((out / "study_eval.json").read_text())
    log_rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    log_rows = [row for row in log_rows if "loss" in row]  # a resume may add a warning row
    samples_per_s = log_rows[-1]["samples_per_s"]  # of the run's last session: a resumed run restarts the clock
    train_seconds = args.steps * BATCH_SIZE / samples_per_s
    record(results_path, key, {
        "arm": arm, "seed": seed, "flags": flags, "steps": args.steps,
        "train_seconds": round(train_seconds, 1), "eval_seconds": round(time.perf_counter() - start, 1),
        "samples_per_s": round(samples_per_s, 2), "final_loss": log_rows[-1]["loss"],
        "loss_curve": [[row["step"], row["loss"]] for row in log_rows[:: max(1, len(log_rows) // 60)]],
        **evaluation,
    })  # fmt: skip
    print(f"{key}: done ({train_seconds:.0f} s of training steps)", flush=True)


def evaluate_run(args: argparse.Namespace) -> None:
    """Scores of one run's snapshots and final pipeline, written to <run>/study_eval.json (internal command)."""
    import torch

    from hf_scratch.evaluation import ceiling_scores, generate_and_score, load_dataset_folder, load_judge, sample_split
    from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline
    from hf_scratch.schedulers import make_scheduler

    torch.set_num_threads(1)
    out = Path(args.evaluate)
    dataset = load_dataset_folder(args.data)
    judge, tokenizer = load_judge(JUDGE)
    settings = {"seed": 0, "guidance": args.guidance, "resolution": 32, "batch_size": 128, "frechet_ridge": 1e-6}
    samples = {
        split: sample_split(dataset[split], split, args.prompts, 32, judge, tokenizer, settings["batch_size"])
        for split in SPLITS
    }
    folders = {args.steps // 3: out / "snapshots" / f"step-{args.steps // 3}",
               2 * args.steps // 3: out / "snapshots" / f"step-{2 * args.steps // 3}", args.steps: out}  # fmt: skip
    checkpoints, ceiling = {}, None
    for step, folder in folders.items():
        pipe = ScratchStableDiffusionPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        training_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        objective = objective_of(training_config)
        pipe.scheduler = make_scheduler(SAMPLERS[objective], pipe.scheduler.config)
        count = args.prompts if step == args.steps else args.prompts_midway
        checkpoints[str(step)] = {}
        for split, sample in samples.items():
            checkpoints[str(step)][split] = {
                str(steps): generate_and_score(pipe, sample.head(count), judge, settings, steps)[0]
                for steps in STEP_COUNTS
            }
        if step == args.steps:
            ceiling = {split: ceiling_scores(pipe.vae, sample, judge, settings) for split, sample in samples.items()}
    result = {"objective": objective, "sampler": type(pipe.scheduler).__name__, "checkpoints": checkpoints,
              "ceiling": ceiling}  # fmt: skip
    (out / "study_eval.json").write_text(json.dumps(result, indent=1) + "\n")


def objective_of(scheduler_config: dict) -> str:
    """The training objective a saved scheduler config stands for."""
    from hf_scratch.schedulers import scheduler_family

    family = scheduler_family(scheduler_config)
    return {"edm": "edm", "flow": "flow_matching"}.get(family) or scheduler_config["prediction_type"]


def run(args: argparse.Namespace) -> None:
    """Train the missing runs, two at a time; A5 waits for A3 and A4 (it is queued last)."""
    order = [arm for arm in ("A3", "A4", "A0", "A1", "A2") if arm in args.arms]
    queue = [(arm, seed) for seed in args.seeds for arm in order]
    queue += [("A5", seed) for seed in args.seeds if "A5" in args.arms]
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        early = [pool.submit(train_and_evaluate, args, arm, seed) for arm, seed in queue if arm != "A5"]
        for future in early:
            future.result()
        for future in [pool.submit(train_and_evaluate, args, arm, seed) for arm, seed in queue if arm == "A5"]:
            future.result()
    report(args)


# ------------------------------------------------------------------------------------------------------- report
def report(args: argparse.Namespace) -> None:
    results = Path(args.results)
    write_report(results, results.with_suffix(".md"), results.with_suffix(".png"), DESIGN)


def main() -> None:
    args = parse_args()
    if args.evaluate:
        evaluate_run(args)
    elif args.command == "run":
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
