"""Align Your Steps for the shipped flow model: σ schedules optimised for emoji32's Euler sampler.

Align Your Steps (Sabour et al. 2024, arXiv:2404.14507) fits a sampler's discretisation σ_1 > … > σ_n to one model by
minimising an upper bound (KLUB) on the mismatch between the discretised and the true process (Sec. 3). For a
deterministic ODE sampler what that bound stands in for is the distance between the n-step solution and the exact
solution of the same ODE from the same noise; here that distance is measured directly:

    E(σ_1..σ_n) = 1/K Σ_k ‖Euler_σ(x_1^k) − x_0^{*k}‖² / D                                         (1)

with x_1^k = ε^k seeded noise, Euler_σ the flow-matching Euler sampler on the classifier-free-guided velocity
(w = 4, the shipped default)

    v̂(x, σ) = v_θ(x, σ, ∅) + w (v_θ(x, σ, c) − v_θ(x, σ, ∅)),    x_{σ'} = x_σ + (σ' − σ) v̂(x_σ, σ)         (2)

with σ_{n+1} = 0, and x_0^* a fine reference solve of dx/dσ = v̂ (the Euler solutions at N = 64 and 2N = 128 uniform
steps, Richardson-extrapolated: Euler's error is O(h), so 2 x_2N − x_N cancels its first-order term).

σ_1 = 1 stays fixed (the start is pure noise); the interior is searched on u = log(σ / (1 − σ)) = −λ/2, λ the
flow's log-SNR log((1 − σ)² / σ²), in the manner of AYS's iterative refinement, which moves one t_i at a time
between its neighbours: coordinate descent, each u_i moved by ±h while it stays strictly between its neighbours,
h halved when a sweep improves nothing. Steps counts not optimised are log-linearly interpolated from a smaller
optimised schedule (AYS Sec. 3.3). Every schedule is scored on a held-out set of other prompts and noises, beside
the scheduler's default (uniform in σ) and the shifted schedules σ' = sσ / (1 + (s − 1)σ) (Esser et al. 2024, Eq. 23).

    python training/optimise_schedule.py                        # steps 4 8 16 32, optimising 4 and 8
    python training/optimise_schedule.py --optimise 4 8 16      # optimise 16 too (32 interpolates 16)

Results go to docs/optimised_schedules.json; a re-run skips the step counts already there (--redo to recompute).
Use one in the pipeline as `pipe(prompts, sigmas=schedule, guidance_scale=4.0)`.
"""

import argparse
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "hf_scratch" / "pretrained" / "emoji32"
OUTPUT = ROOT / "docs" / "optimised_schedules.json"

GUIDANCE_SCALE = 4.0  # the shipped default
SHIFTS = (2.0, 3.0)
# Hash positions (`hash_sample` order of the train split) of the two prompt sets: clear of the first 256 of each split,
# which emoji-bench and the sampling study score on.
OPTIMISE_OFFSET, HELDOUT_OFFSET = 1000, 2000

logger = logging.getLogger("optimise_schedule")


# ------------------------------------------------------------------------------------------------------------------
# Schedules: σ_1 > … > σ_n in (0, 1], with σ_{n+1} = 0 appended by the sampler
# ------------------------------------------------------------------------------------------------------------------
def linear_sigmas(n: int, sigma_min: float = 1e-3) -> list[float]:
    """The flow scheduler's default: n values uniform in σ from 1 to σ_min (the shipped scheduler's last σ)."""
    return np.linspace(1.0, sigma_min, n).tolist()


def shifted(sigmas: Sequence[float], shift: float) -> list[float]:
    """σ' = sσ / (1 + (s − 1)σ), the resolution shift of Esser et al. 2024 (Eq. 23)."""
    return [shift * s / (1 + (shift - 1) * s) for s in sigmas]


def log_linear_interpolation(sigmas: Sequence[float], n: int) -> list[float]:
    """n values whose log σ interpolates linearly between the given ones over the step index (AYS Sec. 3.3)."""
    given = np.linspace(0, 1, len(sigmas))
    return np.exp(np.interp(np.linspace(0, 1, n), given, np.log(sigmas))).tolist()


def logit(sigma: float) -> float:
    """u = log(σ / (1 − σ)) = −λ/2, λ the flow's log-SNR."""
    return math.log(sigma / (1 - sigma))


def expit(u: float) -> float:
    return 1 / (1 + math.exp(-u))


def is_schedule(sigmas: Sequence[float]) -> bool:
    """Strictly decreasing and in (0, 1], as the flow scheduler's `set_timesteps(sigmas=...)` takes."""
    return all(0 < s <= 1 for s in sigmas) and all(b < a for a, b in zip(sigmas, sigmas[1:]))


# ------------------------------------------------------------------------------------------------------------------
# The sampler and the objective
# ------------------------------------------------------------------------------------------------------------------
Velocity = Callable[[torch.Tensor, float], torch.Tensor]


def euler(velocity: Velocity, x: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Euler's method on dx/dσ = v̂(x, σ) from σ_1 down to 0 (Eq. 2), as `ScratchFlowMatchEulerScheduler.step`."""
    for sigma, sigma_next in zip(sigmas, [*sigmas[1:], 0.0]):
        x = x + (sigma_next - sigma) * velocity(x, sigma)
    return x


def mean_squared_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Eq. 1: the squared distance per latent element, averaged over the K samples."""
    return (x.double() - reference.double()).pow(2).mean().item()


def optimise(
    error: Callable[[list[float]], float],
    sigmas: Sequence[float],
    step: float = 0.5,
    min_step: float = 0.02,
    max_evaluations: int = 200,
) -> tuple[list[float], float, int]:
    """AYS's iterative refinement as coordinate descent on u_i = logit σ_i, i = 2..n (σ_1 = 1 fixed): try u_i ± h,
    keeping σ_i strictly between σ_{i−1} and σ_{i+1} (σ_{n+1} = 0), keep any move that lowers `error`; halve h after
    a sweep without one. Returns the schedule, its error and the number of `error` evaluations."""
    if not is_schedule(sigmas) or sigmas[0] != 1.0:
        raise ValueError(f"`sigmas` must start at 1 and decrease strictly in (0, 1], got {list(sigmas)}.")
    sigmas = list(sigmas)
    best, evaluations = error(sigmas), 1
    while step >= min_step and evaluations < max_evaluations:
        improved = False
        for i in range(1, len(sigmas)):
            for direction in (1.0, -1.0):
                candidate = sigmas.copy()
                candidate[i] = expit(logit(sigmas[i]) + direction * step)
                if not is_schedule(candidate) or evaluations >= max_evaluations:
                    continue
                value = error(candidate)
                evaluations += 1
                if value < best:
                    sigmas, best, improved = candidate, value, True
                    break
        if not improved:
            step /= 2
    return sigmas, best, evaluations


class GuidedVelocity:
    """v̂(x, σ) of Eq. 2 for fixed prompts: one U-Net call on [x; x] with [uncond; cond] text at timestep 1000σ."""

    def __init__(self, pipeline, prompts: Sequence[str], guidance_scale: float = GUIDANCE_SCALE):
        self.unet = pipeline.unet
        self.guidance_scale = guidance_scale
        self.num_train_timesteps = pipeline.scheduler.config.num_train_timesteps
        self.embeds = pipeline.guidance_embeddings(list(prompts), "cpu", 1, guidance_scale, None, None, None, None)
        self.evaluations = 0

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        timestep = torch.tensor(sigma * self.num_train_timesteps, dtype=torch.float32)
        self.evaluations += 1
        v_uncond, v_cond = self.unet(torch.cat([x, x]), timestep, encoder_hidden_states=self.embeds)[0].chunk(2)
        return v_uncond + self.guidance_scale * (v_cond - v_uncond)


# ------------------------------------------------------------------------------------------------------------------
# Prompts, noise and references
# ------------------------------------------------------------------------------------------------------------------
def train_prompts(data: Path, offset: int, count: int) -> list[str]:
    """Captions at hash positions [offset, offset + count) of the train split (`hash_sample`'s order: distinct
    captions by SHA-256), checked disjoint from the first 256 of `train` and `validation`."""

    def hash_ordered(split: str) -> list[str]:
        lines = (data / split / "metadata.jsonl").read_text().splitlines()
        texts = {json.loads(line)["text"] for line in lines if line.strip()}
        return sorted(texts, key=lambda text: hashlib.sha256(text.encode()).hexdigest())

    ordered = hash_ordered("train")
    prompts = ordered[offset : offset + count]
    scored = set(ordered[:256]) | set(hash_ordered("validation")[:256])
    if len(prompts) < count or scored & set(prompts):
        raise ValueError(f"train has no {count} captions at hash positions {offset}+ clear of the scored 256.")
    return prompts


def seeded_noise(pipeline, count: int, seed: int) -> torch.Tensor:
    """x_1 = ε as the pipeline draws it with `generator=[torch.Generator().manual_seed(seed + k) for k < count]`."""
    from diffusers.utils.torch_utils import randn_tensor

    generators = [torch.Generator().manual_seed(seed + k) for k in range(count)]
    size = pipeline.unet.config.sample_size
    return randn_tensor((count, pipeline.unet.config.in_channels, size, size), generator=generators)


def reference_solution(
    velocity: Velocity, noise: torch.Tensor, steps: int, check: bool = True
) -> tuple[torch.Tensor, dict]:
    """x_0^* = 2 x_{2N} − x_N, the Richardson extrapolation of N- and 2N-step uniform Euler (Euler's error is
    C h + O(h²), so this cancels the first-order term), with two accuracy figures as mean squared distances:
    x_{2N} − x_N (how far doubling plain Euler's steps moves it; for a first-order method about the N-step error) and,
    with `check`, x_0^* − (2 x_N − x_{N/2}) (the extrapolation one level coarser; it bounds x_0^*'s error only when
    N/2 steps are already in Euler's asymptotic regime, and is dominated by the coarser one's error otherwise)."""
    coarse, fine = (euler(velocity, noise, linear_sigmas(m, 1 / m)) for m in (steps, 2 * steps))
    reference = 2 * fine - coarse
    accuracy = {f"euler_{2 * steps}_vs_{steps}": mean_squared_error(fine, coarse)}
    if check:
        half = euler(velocity, noise, linear_sigmas(steps // 2, 2 / steps))
        accuracy[f"extrapolated_{steps}_{2 * steps}_vs_{steps // 2}_{steps}"] = mean_squared_error(
            reference, 2 * coarse - half
        )
    return reference, accuracy


def cached_reference(
    cache: Path, key: dict, solve: Callable[[], tuple[torch.Tensor, dict]]
) -> tuple[torch.Tensor, dict]:
    """`solve()`, or its result saved in `cache` under the same `key` (the reference is the run's costliest part)."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"reference_{name}.pt"
    if path.is_file():
        saved = torch.load(path)
        return saved["reference"], saved["accuracy"]
    reference, accuracy = solve()
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"key": key, "reference": reference, "accuracy": accuracy}, path)
    return reference, accuracy


# ------------------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------------------
METHOD = (
    "Align Your Steps (Sabour et al. 2024, arXiv:2404.14507), with the distance it bounds measured directly: the mean "
    "squared error of the n-step Euler solution's final latents (guidance 4, classifier-free) against a reference "
    "solution of the same guided flow ODE from the same seeded noise (Richardson-extrapolated uniform Euler, "
    "2 x_2N - x_N), over K prompts. sigma_1 = 1 fixed; the interior searched on u = log(sigma / (1 - sigma)) "
    "(-logSNR/2) by coordinate descent (AYS's iterative refinement of each step between its neighbours): u_i +- h, "
    "kept if the error falls, h halved after a sweep without a gain, from the default schedule. Step counts not "
    "optimised are log-linear interpolations over the step index of the largest optimised schedule below them "
    "(AYS Sec. 3.3). Errors under 'heldout_mse' are on K other train prompts and noises, never used in the search."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=SHIPPED, help="pipeline folder (default: the shipped emoji32)")
    parser.add_argument("--data", type=Path, default=Path("/tmp/emoji_eval/data"), help="emoji dataset folder")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="results JSON, read back to skip finished n")
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 32], help="step counts to report")
    parser.add_argument("--optimise", type=int, nargs="+", default=[4, 8], help="step counts to optimise")
    parser.add_argument("--num-prompts", type=int, default=64, help="K, prompts (and noises) in each set")
    parser.add_argument("--reference-steps", type=int, default=64, help="N of the 2 x_2N - x_N reference")
    parser.add_argument("--max-evaluations", type=int, default=40, help="objective evaluations per optimised n")
    parser.add_argument("--seed", type=int, default=0, help="noise of prompt k is seeded seed + k (held out: +10^6)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/optimise_schedule"), help="reference latents")
    parser.add_argument("--redo", action="store_true", help="recompute step counts already in --output")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)

    results = json.loads(args.output.read_text()) if args.output.is_file() and not args.redo else {}
    schedules = results.get("schedules", {})
    todo = [n for n in sorted(args.steps) if str(n) not in schedules]
    if not todo:
        logger.info("all of %s already in %s", args.steps, args.output)
        return

    from hf_scratch.evaluation import load_pipeline

    start = time.time()
    pipeline = load_pipeline(args.model)
    pipeline.set_progress_bar_config(disable=True)
    sigma_min = pipeline.scheduler.sigma_min  # the default schedule's last σ before the appended 0
    sets = {}
    for name, offset, seed in (
        ("optimise", OPTIMISE_OFFSET, args.seed),
        ("heldout", HELDOUT_OFFSET, args.seed + 10**6),
    ):
        prompts = train_prompts(args.data, offset, args.num_prompts)
        velocity = GuidedVelocity(pipeline, prompts)
        noise = seeded_noise(pipeline, args.num_prompts, seed)
        key = {"model": str(args.model.resolve()), "prompts": prompts, "seed": seed, "steps": args.reference_steps}
        t0 = time.time()
        reference, accuracy = cached_reference(
            args.cache, key, lambda: reference_solution(velocity, noise, args.reference_steps, check=name == "optimise")
        )
        logger.info("%s reference: %s (%.0f s)", name, accuracy, time.time() - t0)
        sets[name] = (velocity, noise, reference, accuracy, offset, seed)

    def error(name: str, sigmas: Sequence[float]) -> float:
        velocity, noise, reference = sets[name][:3]
        return mean_squared_error(euler(velocity, noise, sigmas), reference)

    results.update(
        method=METHOD,
        model=str(args.model.relative_to(ROOT) if args.model.resolve().is_relative_to(ROOT) else args.model),
        guidance_scale=GUIDANCE_SCALE,
        num_prompts=args.num_prompts,
        prompts=f"train split, hash positions {OPTIMISE_OFFSET}+ (search) and {HELDOUT_OFFSET}+ (held out)",
        seed=args.seed,
        heldout_seed=args.seed + 10**6,
        reference_solver=f"2 x_{2 * args.reference_steps} - x_{args.reference_steps} of uniform Euler",
        reference_accuracy_mse={name: value[3] for name, value in sets.items()},
    )
    for n in todo:
        t0 = time.time()
        default = linear_sigmas(n, sigma_min)
        optimised = [int(m) for m in schedules if int(m) < n and schedules[m]["how"] == "optimised"]
        if n in args.optimise:
            # start from the default, or from the interpolated smaller optimum where that is already better
            start_sigmas = default
            if optimised:
                interpolated = log_linear_interpolation(schedules[str(max(optimised))]["sigmas"], n)
                if error("optimise", interpolated) < error("optimise", default):
                    start_sigmas = interpolated
            sigmas, search_mse, evaluations = optimise(
                lambda s: error("optimise", s), start_sigmas, max_evaluations=args.max_evaluations
            )
            how, extra = "optimised", {"search_mse": search_mse, "evaluations": evaluations}
        elif optimised:
            source = max(optimised)
            sigmas = log_linear_interpolation(schedules[str(source)]["sigmas"], n)
            how, extra = f"log-linear interpolation of the {source}-step schedule", {}
        else:
            logger.info("skipping %d steps: no smaller optimised schedule to interpolate", n)
            continue
        sigmas = [round(s, 4) for s in sigmas]
        heldout = {"default": error("heldout", default)}
        heldout.update({f"shift_{s:g}": error("heldout", shifted(default, s)) for s in SHIFTS})
        heldout["optimised"] = error("heldout", sigmas)
        schedules[str(n)] = {
            "sigmas": sigmas, "how": how, "heldout_mse": heldout, **extra, "wall_seconds": round(time.time() - t0, 1)
        }  # fmt: skip
        results["schedules"] = dict(sorted(schedules.items(), key=lambda item: int(item[0])))
        results["wall_seconds_last_run"] = round(time.time() - start, 1)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        logger.info("%d steps (%s, %.0f s): %s; held-out MSE %s", n, how, time.time() - t0, sigmas, heldout)


if __name__ == "__main__":
    main()
