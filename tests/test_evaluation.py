"""Tests for `hf_scratch.evaluation` (emoji-bench): the prompt sample, the sampler specs, the judge's features, the
independent image-quality comparisons and the saturated judge figures, and an end-to-end run of `main` on a tiny random
pipeline, judge CLIP and emoji dataset (random models: no quality asserted). The metrics themselves are tested in
test_metrics.py.
"""

import json
import math
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from hf_scratch.cli import eval_main as main
from hf_scratch.data.emoji import SPLITS, build_emoji_dataset
from hf_scratch.evaluation import (
    GRID_ROWS,
    hash_sample,
    independent_scores,
    judge_image_features,
    judge_text_features,
    parse_sampler,
    saturated_judge_figures,
    to_markdown,
)
from hf_scratch.models.clip import ScratchCLIPConfig, ScratchCLIPModel
from hf_scratch.pipelines.text_to_image import ScratchStableDiffusionPipeline
from hf_scratch.schedulers.ddim import ScratchDDIMScheduler

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import TEXT_CONFIG, tiny_components, tiny_tokenizer  # noqa: E402


def test_hash_sample_is_deterministic_distinct_and_independent_of_order():
    texts = [f"caption {i}" for i in range(20)] + ["caption 3"]
    sample = hash_sample(texts, 5)
    assert len({texts[i] for i in sample}) == 5
    reversed_texts = texts[::-1]
    assert [reversed_texts[i] for i in hash_sample(reversed_texts, 5)] == [texts[i] for i in sample]


def test_parse_sampler_reads_name_and_steps_and_rejects_the_rest():
    assert parse_sampler("dpm++-20") == ("dpm++", 20)
    assert parse_sampler("ddpm-1000") == ("ddpm", 1000)
    for spec in ("ddim", "euler-10", "ddim-0", "ddim-x"):
        with pytest.raises(ValueError, match="samplers="):
            parse_sampler(spec)


def test_saturated_judge_figures_are_those_above_the_true_images_score():
    true = {"top1": 0.5, "top5": 0.7}
    assert saturated_judge_figures({"top1": 0.4, "top5": 0.8}, true) == ["top5"]
    assert saturated_judge_figures({"top1": 0.5, "top5": 0.7}, true) == []  # equal is not above
    assert saturated_judge_figures({"top1": 0.6, "top5": 0.9}, true) == ["top1", "top5"]


def test_independent_scores_compare_equal_sizes_and_the_same_halves():
    pytest.importorskip("efficientnet_lite_pytorch", reason='pip install "hf-scratch[train]"')
    real = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    settings = {"batch_size": 16, "seed": 0, "device": "cpu", "frechet_ridge": 1e-6}
    scores = independent_scores(real, real, settings)  # a generator that returns the true images
    assert scores["generated"]["frechet_distance"] == pytest.approx(0, abs=1e-6)
    assert (scores["generated"]["precision"], scores["generated"]["recall"]) == (1.0, 1.0)
    assert (scores["generated"]["num_generated"], scores["floor"]["num_generated"], scores["floor"]["num_true"]) == (
        16, 8, 8
    )  # fmt: skip
    # the generated images of half A against the true images of half B: here the floor itself
    assert scores["generated_half"] == pytest.approx(scores["floor"], rel=1e-9)
    assert scores["floor"]["frechet_distance"] > 0
    few = independent_scores(real[:6], real[:6], settings)
    assert few["generated"] is not None and few["generated_half"] is None and few["floor"] is None


def tiny_judge() -> ScratchCLIPModel:
    vision_config = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    config = ScratchCLIPConfig(text_config=TEXT_CONFIG, vision_config=vision_config, projection_dim=8)
    return ScratchCLIPModel(config).eval()


def test_judge_features_are_normalised_and_equal_for_transformers_clip():
    ours = tiny_judge()
    vision_config = ours.config.vision_config.to_dict()
    theirs = CLIPModel(CLIPConfig(text_config=TEXT_CONFIG, vision_config=vision_config, projection_dim=8))
    theirs.load_state_dict(ours.state_dict())
    images, texts = torch.rand(3, 3, 16, 16), ["red heart, noto style", "divide, twemoji style"]
    image_features = judge_image_features(ours, images, batch_size=2)
    assert torch.allclose(image_features.norm(dim=-1), torch.ones(3))
    assert torch.allclose(image_features, judge_image_features(theirs.eval(), images, batch_size=2), atol=1e-5)
    text_features = judge_text_features(ours, tiny_tokenizer(), texts, batch_size=1)
    assert torch.allclose(text_features, judge_text_features(theirs, tiny_tokenizer(), texts, batch_size=1), atol=1e-5)


@pytest.fixture(scope="module")
def bench_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    build_emoji_dataset(root / "data", resolution=16, limit=12, validation_fraction=0.3, heldout_style_fraction=0.4)
    components = tiny_components("scratch")
    ScratchStableDiffusionPipeline(**components, scheduler=ScratchDDIMScheduler()).save_pretrained(root / "model")
    tiny_judge().save_pretrained(root / "judge")
    tiny_tokenizer().save_pretrained(root / "judge" / "tokenizer")
    return {"root": root, "data": root / "data", "model": root / "model", "judge": root / "judge"}


@pytest.fixture
def one_thread():
    """The tiny models run faster on one thread than on several of a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _folder_args(bench_inputs: dict[str, Path], out: Path) -> list[str]:
    return [
        "--model", str(bench_inputs["model"]), "--clip", str(bench_inputs["judge"]),
        "--data", str(bench_inputs["data"]), "--out", str(out), "--cache_dir", str(bench_inputs["root"] / "cache"),
        "--device", "cpu",
    ]  # fmt: skip


def _numbers(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _numbers(value)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


def test_main_writes_json_markdown_and_grid_with_finite_numbers(bench_inputs, one_thread, capsys):
    out = bench_inputs["root"] / "out"
    argv = [
        *_folder_args(bench_inputs, out), "--num_prompts", "4", "--num_prompts_samplers", "2", "--steps", "2",
        "--resolution", "16", "--samplers", "ddpm-3", "ddim-2", "dpm++-2",
    ]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "emoji_bench.json").read_text())
    assert set(results) == {
        "model", "judge", "data", "vae", "clip", "generation", "ceiling", "independent", "samplers", "settings",
        "seconds",
    }  # fmt: skip
    for split, ceiling in results["ceiling"].items():
        # the true images' own Fréchet distance, PSNR and SSIM are trivial and left out; the VAE's are measured
        assert ceiling["true"]["frechet_clip"] is None and ceiling["true"]["psnr"] is None
        assert ceiling["vae"]["frechet_clip"] >= 0
        assert (ceiling["vae"]["psnr"] is None) == (split == "validation")
        assert ceiling["true"]["prompts"] == results["generation"][split]["prompts"]
    assert set(results["generation"]) == set(SPLITS)
    assert set(results["samplers"]) == {"ddpm-3", "ddim-2", "dpm++-2"}
    assert set(results["clip"]) == {"images", "text_to_image", "image_to_text"}
    for split, scores in results["generation"].items():
        assert scores["prompts"] == min(4, scores["captions"])
        assert scores["chance_top1"] == pytest.approx(1 / scores["captions"])
        assert 0 <= scores["top1"] <= scores["top5"] <= 1
        assert (scores["psnr"] is None) == (split == "validation")
        true = results["ceiling"][split]["true"]
        assert scores["saturated"] == [key for key in ("top1", "top5") if scores[key] > true[key]]
    assert set(results["independent"]) == set(SPLITS)
    for split, comparisons in results["independent"].items():
        # up to 4 prompts: the halves (2 a side) are too few for k = 3 neighbours, and a split of 3 captions too
        assert comparisons["generated_half"] is None and comparisons["floor"] is None
        prompts = results["generation"][split]["prompts"]
        quality = comparisons["generated"]
        assert (quality is None) == (prompts < 4), (split, prompts)
        if quality is not None:
            assert quality["num_generated"] == quality["num_true"] == prompts
            assert quality["frechet_distance"] >= 0 and 0 <= quality["precision"] <= 1 and 0 <= quality["recall"] <= 1
    for scores in results["samplers"].values():
        assert scores["prompts"] == 2 and scores["frechet_clip"] is not None and scores["psnr"] is not None
    numbers = list(_numbers(results))
    assert numbers and all(math.isfinite(number) for number in numbers)
    markdown = (out / "emoji_bench.md").read_text()
    assert markdown in capsys.readouterr().out
    assert "| ddpm-3 |" in markdown and "| heldout_style |" in markdown and "| heldout_style | vae |" in markdown
    assert "## Independent image quality" in markdown and "| validation | generated vs true | 4 / 4 |" in markdown
    assert "| validation | floor: true, half A vs true, half B | – |" in markdown
    results["generation"]["train"]["saturated"] = ["top5"]
    top5 = results["generation"]["train"]["top5"]
    assert f"| {top5:.3f} (saturated) |" in to_markdown(results)
    with PIL.Image.open(out / "grid.png") as grid:
        rows = sum(min(GRID_ROWS[split], results["generation"][split]["prompts"]) for split in SPLITS)
        cell = grid.width // 4  # text (two cells wide), generated, true
        assert grid.width % 4 == 0 and 0 < grid.height - rows * cell < cell  # a header, then the rows


def test_main_reports_a_bad_sampler_as_a_usage_error(bench_inputs, capsys):
    assert main([*_folder_args(bench_inputs, bench_inputs["root"] / "bad"), "--samplers", "euler-10"]) == 2
    assert "samplers='euler-10'" in capsys.readouterr().err


def test_a_flow_model_is_benchmarked_with_its_own_samplers(bench_inputs, one_thread):
    from hf_scratch.evaluation import DEFAULT_SAMPLERS, load_dataset_folder, load_judge, run_emoji_bench
    from hf_scratch.schedulers.flow_match import ScratchFlowMatchEulerScheduler

    pipe = ScratchStableDiffusionPipeline(**tiny_components("scratch"), scheduler=ScratchFlowMatchEulerScheduler())
    pipe.set_progress_bar_config(disable=True)
    judge, tokenizer = load_judge(bench_inputs["judge"])
    results = run_emoji_bench(
        pipe, judge, tokenizer, load_dataset_folder(bench_inputs["data"], str(bench_inputs["root"] / "cache")),
        num_prompts=2, num_prompts_samplers=2, steps=2, resolution=16,
    )  # fmt: skip
    assert tuple(results["samplers"]) == DEFAULT_SAMPLERS["flow"]
    assert all(math.isfinite(scores["top5"]) for scores in results["samplers"].values())
