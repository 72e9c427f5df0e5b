"""The benchmark harness (`python -m benchmarks`) at tiny size: every case reports, and the reports are well formed.

These tests check the harness, not the speed: wall-clock figures on a shared CI machine say nothing, so no test here
asserts a time or a ratio target. One thread keeps the tiny models fast on a loaded machine (two OpenMP threads on two
busy cores wait on each other far longer than the work takes).
"""

import json
import math
from pathlib import Path

import pytest

from benchmarks.cases import CASES, FAST_PATHS
from benchmarks.run import main

# Cases that add a second row: the tiled decode reports its time and its peak RSS.
EXPECTED_CASES = [case for name in CASES for case in ([name, f"{name}_memory"] if name.endswith("_tiled") else [name])]


def _run(tmp_path: Path, *options: str) -> tuple[dict, str]:
    markdown, results = tmp_path / "BENCHMARKS.md", tmp_path / "results.json"
    main(["--size", "tiny", "--repeats", "1", "--warmup", "1", "--threads", "1", *options,
          "--out", str(markdown), "--json", str(results)])  # fmt: skip
    return json.loads(results.read_text()), markdown.read_text()


def test_every_case_reports_positive_times_and_finite_ratios(tmp_path: Path) -> None:
    payload, markdown = _run(tmp_path, "--no-fast", "--no-peers", "--no-bf16")
    cases = [row["case"] for row in payload["rows"]]
    assert cases == EXPECTED_CASES
    for row in payload["rows"]:
        assert row["value"] > 0 and row["reference"] > 0, row
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        assert all(t > 0 for t in row["times"] + row["reference_times"]), row
        assert f"`{row['case']}`" in markdown
    # ours and diffusers hold the same weights, so eager outputs agree to float32 rounding.
    for row in payload["rows"]:
        if "rel_err_vs_diffusers" in row["extra"]:
            assert row["extra"]["rel_err_vs_diffusers"] < 1e-4, row
    assert payload["machine"]["cores"] >= 1 and len(payload["machine"]["loadavg_end"]) == 3
    assert {check["case"] for check in payload["targets"]} == {
        "unet_512", "vae_decode_512", "generate_512_memory", "train_step", "train_step_emoji32", "generate_emoji32"
    }  # fmt: skip


def test_hand_written_notes_survive_a_rerun(tmp_path: Path) -> None:
    notes = "<!-- notes -->\nWhat we tried.\n<!-- /notes -->"
    (tmp_path / "BENCHMARKS.md").write_text(f"# old\n\n{notes}\n")
    _, markdown = _run(tmp_path, "--no-fast", "--no-peers", "--cases", "text_encoder")
    assert notes in markdown and "# old" not in markdown


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        main(["--repeats", "0"])
    with pytest.raises(SystemExit):
        main(["--cases", "no_such_case"])


# The fast paths each case times (freeze_for_inference is for the small emoji32 U-Net).
CASE_PATHS = {
    "unet_512": ["winograd", "compile"],
    "vae_decode_512": ["winograd", "compile"],
    "pipeline_256": ["winograd", "compile"],
    "generate_emoji32": ["freeze", "compile"],
}


def _check_fast_rows(payload: dict, paths: list[str]) -> None:
    variants = {(row["case"], row["variant"]) for row in payload["rows"]}
    fast_variants = {FAST_PATHS[path][0] for path in paths}
    for case in {row["case"] for row in payload["rows"]} & set(CASE_PATHS):
        assert {(case, FAST_PATHS[path][0]) for path in paths if path in CASE_PATHS[case]} <= variants, case
    for row in payload["rows"]:
        assert row["value"] > 0 and math.isfinite(row["ratio"]), row
        if row["variant"] in fast_variants:
            assert row["extra"]["rel_err_vs_eager"] < 1e-4 and row["extra"]["setup_s"] > 0, row


def test_winograd_variant_at_tiny_size(tmp_path: Path) -> None:
    payload, _ = _run(tmp_path, "--fast", "winograd", "--no-peers", "--cases", "unet_512", "vae_decode_512",
                      "pipeline_256")  # fmt: skip
    _check_fast_rows(payload, ["winograd"])


def test_freeze_variant_at_tiny_size(tmp_path: Path) -> None:
    payload, _ = _run(tmp_path, "--fast", "freeze", "--no-peers", "--cases", "unet_512", "generate_emoji32")
    _check_fast_rows(payload, ["freeze"])
    frozen = [row for row in payload["rows"] if row["variant"] == FAST_PATHS["freeze"][0]]
    assert [row["case"] for row in frozen] == ["generate_emoji32"]


def test_update_keeps_rows_not_measured_again(tmp_path: Path) -> None:
    _run(tmp_path, "--no-fast", "--no-peers", "--no-bf16", "--cases", "text_encoder", "unet_256")
    payload, _ = _run(tmp_path, "--no-fast", "--no-peers", "--no-bf16", "--cases", "unet_256", "--update")
    assert [row["case"] for row in payload["rows"]] == ["unet_256", "text_encoder"]


def test_update_keeps_the_versions_of_packages_this_run_lacks(tmp_path: Path) -> None:
    payload, _ = _run(tmp_path, "--no-fast", "--no-peers", "--cases", "text_encoder")
    (machine,) = payload["machines"].values()
    machine["versions"]["some-peer"] = "1.2.3"  # as if an earlier run had a peer installed
    (tmp_path / "results.json").write_text(json.dumps(payload))
    payload, markdown = _run(tmp_path, "--no-fast", "--no-peers", "--cases", "text_encoder", "--update")
    assert payload["machine"]["versions"]["some-peer"] == "1.2.3" and "some-peer 1.2.3" in markdown


def test_bf16_variants_at_tiny_size(tmp_path: Path) -> None:
    """--bf16 (the default on a CPU that computes it natively): ours in bfloat16, diffusers' U-Net cast to bfloat16,
    and both trainers under bfloat16 autocast, each against diffusers in float32."""
    payload, markdown = _run(tmp_path, "--bf16", "--no-fast", "--cases", "unet_512", "vae_decode_512",
                             "train_step_emoji32")  # fmt: skip
    variants = {(row["case"], row["variant"]): row for row in payload["rows"]}
    for key in [
        ("unet_512", "ours bf16"),
        ("unet_512", "diffusers bf16"),
        ("vae_decode_512", "ours bf16"),
        ("train_step_emoji32", "ours + bf16 autocast"),
        ("train_step_emoji32", "diffusers + bf16 autocast"),
    ]:
        assert key in variants, key
    # bfloat16 keeps 8 significant bits: about 1e-2 relative over a U-Net (docs/usage.md), far above float32's 1e-6.
    for key in [("unet_512", "ours bf16"), ("vae_decode_512", "ours bf16")]:
        assert 1e-4 < variants[key]["extra"]["rel_err_vs_eager"] < 5e-2, key
    assert 1e-4 < variants["unet_512", "diffusers bf16"]["extra"]["rel_err_vs_diffusers"] < 5e-2
    assert "| `unet_512` | " in markdown and "ours bf16" in markdown


def test_rows_of_another_cpu_kind_stay_in_their_own_section(tmp_path: Path) -> None:
    """A results file from before CPU kinds were recorded (one machine, no flags) keeps its rows, under that CPU's
    section, when a run on another CPU updates it; rows of the same case and variant do not replace each other."""
    payload, _ = _run(tmp_path, "--no-fast", "--no-peers", "--no-bf16", "--cases", "text_encoder")
    old = {"machine": {**payload["machine"], "cpu": "Intel(R) Xeon(R) Processor"}, "settings": payload["settings"],
           "rows": payload["rows"], "targets": []}  # fmt: skip
    for key in ("native_bf16", "cpu_flags"):
        old["machine"].pop(key)
    for row in old["rows"]:
        row["extra"].pop("cpu_kind")
    (tmp_path / "results.json").write_text(json.dumps(old))
    payload, markdown = _run(tmp_path, "--no-fast", "--no-peers", "--no-bf16", "--cases", "text_encoder", "--update")
    intel = "Intel(R) Xeon(R) Processor, no native bfloat16"
    assert intel in payload["machines"] and len(payload["machines"]) == 2
    assert sorted(row["extra"]["cpu_kind"] == intel for row in payload["rows"]) == [False, True]
    assert f"## {intel}" in markdown and markdown.count("| `text_encoder` |") == 2
    assert "flags: not recorded" in markdown


@pytest.mark.slow
def test_fast_variants_and_peers_at_tiny_size(tmp_path: Path) -> None:
    """Compiles the tiny models with `hf_scratch.fast` (minutes on a small CPU) and runs the optional peers."""
    payload, _ = _run(tmp_path, "--cases", "unet_512", "vae_decode_512", "pipeline_256", "generate_emoji32",
                      "train_step_emoji32")  # fmt: skip
    _check_fast_rows(payload, list(FAST_PATHS))


def test_trainer_stage_rate_is_the_samples_between_two_logged_steps_over_their_time():
    from benchmarks.trainer_stages import rate_between

    # A first step of 5 s, then 2 s a step at batch 8: the log's samples_per_s is the mean since step 1.
    elapsed = [5.0 + 2.0 * (step - 1) for step in range(1, 7)]
    rows = [{"step": step, "samples_per_s": step * 8 / t} for step, t in zip(range(1, 7), elapsed)]
    assert abs(rate_between(rows, batch=8, first=2) - 4.0) < 1e-9


def test_every_trainer_stage_route_runs_its_trainers_own_flags(tmp_path):
    import argparse

    from benchmarks.trainer_stages import ROUTES, trainer_flags
    from hf_scratch.training import train_unet, train_vae

    args = argparse.Namespace(data=str(tmp_path / "data"), run=tmp_path, steps=30)
    for route in ROUTES[:-1]:  # the last is diffusers' loop
        module, flags, batch = trainer_flags(route, args, tmp_path / "round")
        parsed = {"train_unet": train_unet.parse_args, "train_vae": train_vae.parse_args}[module](flags)
        assert parsed.max_train_steps == 30 and parsed.checkpointing_steps == 30 and parsed.train_batch_size == batch
        assert parsed.output_dir.startswith(str(tmp_path / "round"))
        if module == "train_unet":
            assert parsed.cache_latents == ("no caches" not in route)
            assert parsed.cache_text_embeddings == ("recipe" in route)
            assert parsed.dataloader_num_workers == ("worker" in route) and parsed.snapshot_steps == []
