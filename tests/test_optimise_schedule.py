"""training/optimise_schedule.py: the AYS-style search on an ODE with a known solution, and the shipped schedules."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from optimise_schedule import (  # noqa: E402
    OUTPUT,
    euler,
    is_schedule,
    linear_sigmas,
    log_linear_interpolation,
    mean_squared_error,
    optimise,
    shifted,
)

# dx/dσ = a x / (σ + c): x(σ) = x(1) ((σ + c) / (1 + c))^a, which changes fastest near σ = 0, so Euler's error
# depends on where the steps fall and uniform steps are not the best.
A, C = 1.5, 0.05


def toy_velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return A * x / (sigma + C)


def toy_error(sigmas: list[float]) -> float:
    x1 = torch.linspace(-2, 2, 16, dtype=torch.float64)
    exact = x1 * (C / (1 + C)) ** A
    return mean_squared_error(euler(toy_velocity, x1, sigmas), exact)


def test_euler_converges_to_the_exact_solution():
    errors = [toy_error(linear_sigmas(n, 1 / n)) for n in (64, 128, 256)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-4 * toy_error(linear_sigmas(4, 1 / 4))


@pytest.mark.parametrize("n", [4, 8])
def test_optimise_beats_the_uniform_schedule(n):
    uniform = linear_sigmas(n)
    sigmas, error, evaluations = optimise(toy_error, uniform, max_evaluations=150)
    assert sigmas[0] == 1.0 and is_schedule(sigmas) and len(sigmas) == n
    assert error == pytest.approx(toy_error(sigmas))
    assert error < 0.5 * toy_error(uniform)
    assert evaluations <= 150


def test_optimise_refuses_a_schedule_not_starting_at_one():
    with pytest.raises(ValueError, match="start at 1"):
        optimise(toy_error, [0.9, 0.5, 0.1])


def test_schedule_helpers():
    assert is_schedule(shifted(linear_sigmas(8), 3.0)) and shifted([1.0], 3.0) == [1.0]
    assert shifted([0.5], 3.0)[0] == pytest.approx(0.75)
    interpolated = log_linear_interpolation([1.0, 0.5, 0.1], 5)
    assert interpolated[0] == pytest.approx(1.0) and interpolated[-1] == pytest.approx(0.1)
    assert interpolated[1] == pytest.approx(0.5**0.5) and is_schedule(interpolated)


def test_saved_schedules_are_strictly_decreasing_in_unit_interval():
    schedules = json.loads(OUTPUT.read_text())["schedules"]
    assert schedules
    for n, entry in schedules.items():
        sigmas = entry["sigmas"]
        assert len(sigmas) == int(n) and sigmas[0] == 1.0 and is_schedule(sigmas), n
        assert set(entry["heldout_mse"]) >= {"default", "shift_2", "shift_3", "optimised"}
