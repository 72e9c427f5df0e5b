"""FSDP (and DeepSpeed) through accelerate, as far as a CPU can check them.

accelerate runs no FSDP on CPU (v1 refuses, v2 silently becomes DDP: see NOTES), so:
- the plugin that `--fsdp` hands accelerate is checked field by field, and a CPU launch with --fsdp is refused, in one
  process and in two (gloo) processes, rather than trained as DDP;
- torch's own FSDP2 (`fully_shard`) on two CPU processes (torchrun, gloo) shards our U-Net block by block (each
  DTensor's local part holds half the rows), and three AdamW steps match an unsharded run on the whole global batch
  (what DDP computes): the losses within 1e-5 relative, the weights within 2e-4 (a fifth of a step at lr 1e-3);
- a launch whose accelerate config asks for DeepSpeed fails naming `pip install deepspeed` when it is missing.
training/recipes/fsdp_gpu.sh runs the real thing on GPUs.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from test_training import components, data_dir, launch, unet_args  # noqa: F401 (fixtures)

from hf_scratch.models.unet import ScratchUNet2DConditionModel
from hf_scratch.training import trainer

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=16,
    attention_head_dim=8,
    norm_num_groups=8,
)


def test_the_fsdp_plugin_shards_the_unet_block_by_block_with_fsdp2():
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = trainer.fsdp_plugin()
    assert plugin.fsdp_version == 2
    assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
    assert plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"  # save_state / load_state: each rank its shards
    unet = ScratchUNet2DConditionModel(**TINY_UNET)
    blocks = {type(block).__name__ for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]}
    assert set(plugin.transformer_cls_names_to_wrap) == set(trainer.FSDP_WRAPPED_BLOCKS) >= blocks
    assert blocks == {
        "CrossAttnDownBlock2D",
        "DownBlock2D",
        "UNetMidBlock2DCrossAttn",
        "UpBlock2D",
        "CrossAttnUpBlock2D",
    }


def accelerator_args(output_dir: Path, fsdp: bool) -> argparse.Namespace:
    """The flags `create_accelerator` reads."""
    return argparse.Namespace(
        gradient_accumulation_steps=1, mixed_precision="no", report_to="none", output_dir=str(output_dir),
        logging_dir="logs", overwrite_output_dir=False, resume_from_checkpoint=None, fsdp=fsdp,
    )  # fmt: skip


def test_fsdp_on_one_cpu_process_is_refused_not_trained_unsharded(tmp_path):
    args = accelerator_args(tmp_path / "out", fsdp=True)
    try:
        with pytest.raises(ValueError, match=r"--fsdp: accelerate chose NO \(1 process\(es\) on cpu\), not FSDP"):
            trainer.create_accelerator(args)
    finally:
        AcceleratorState._reset_state(True)
    assert not (tmp_path / "out").exists()  # refused before the output folder is claimed


@pytest.mark.parametrize(
    ("flags", "unsupported"),
    [(["--use_ema"], "--use_ema"), (["--validation_prompts", "a"], "--validation_prompts")],
)
def test_fsdp_refuses_what_needs_the_whole_unet_on_one_process(flags, unsupported, tmp_path):
    from hf_scratch.training import train_unet

    with pytest.raises(ValueError, match=rf"--fsdp does not support {unsupported} yet"):
        paths = [f"--{part}_path={tmp_path}" for part in ("vae", "text_encoder", "tokenizer")]
        train_unet.parse_args(["--data", str(tmp_path), "--output_dir", str(tmp_path), *paths, "--fsdp", *flags])


def test_a_deepspeed_config_without_deepspeed_names_the_install(tmp_path, monkeypatch):
    if trainer.find_spec("deepspeed"):
        pytest.skip("deepspeed is installed here")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    args = accelerator_args(tmp_path / "out", fsdp=False)
    with pytest.raises(ValueError, match=r"asks for DeepSpeed, which is not installed: pip install deepspeed"):
        trainer.create_accelerator(args)


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_is_refused_not_trained_as_ddp(tmp_path, data_dir, components):  # noqa: F811
    output_dir = tmp_path / "fsdp"
    args = [*unet_args(data_dir, components, output_dir, steps=2), "--fsdp", "--report_to", "none"]
    args = [a for a in args if a != "--use_ema"]
    cut = args.index("--validation_prompts")
    args = args[:cut] + args[cut + 2 :]
    launcher = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no"]  # fmt: skip
    process = launch("train_unet.py", args, launcher, env={"ACCELERATE_USE_CPU": "1"})
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "--fsdp: accelerate chose MULTI_CPU (2 process(es) on cpu), not FSDP" in output
    assert not (output_dir / "ranks").exists() and not (output_dir / "train_log.jsonl").exists()


SHARDING_WORKER = """
import copy, json, sys
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from hf_scratch.models.unet import ScratchUNet2DConditionModel

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
config = json.loads(sys.argv[2])
sharded = ScratchUNet2DConditionModel(**config)
whole = copy.deepcopy(sharded)  # unsharded, trained on the whole global batch: what DDP computes
for block in [*sharded.down_blocks, sharded.mid_block, *sharded.up_blocks]:
    fully_shard(block)
fully_shard(sharded)
shapes = {name: [list(p.to_local().shape), list(p.shape)] for name, p in sharded.named_parameters()
          if isinstance(p, DTensor)}
plain = [name for name, p in sharded.named_parameters() if not isinstance(p, DTensor)]
optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-3) for model in (sharded, whole)]
per_rank, losses, reference_losses = 2, [], []
for step in range(3):
    generator = torch.Generator().manual_seed(step)
    latents = torch.randn(per_rank * world, 4, 8, 8, generator=generator)
    timesteps = torch.randint(0, 1000, (per_rank * world,), generator=generator)
    text = torch.randn(per_rank * world, 5, config["cross_attention_dim"], generator=generator)
    target = torch.randn(per_rank * world, 4, 8, 8, generator=generator)
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    loss = torch.nn.functional.mse_loss(sharded(latents[mine], timesteps[mine], text[mine]).sample, target[mine])
    loss.backward()  # FSDP reduce-scatters the gradients, averaged over the ranks
    reference = torch.nn.functional.mse_loss(whole(latents, timesteps, text).sample, target)
    reference.backward()
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad()
    losses.append(loss.item())
    reference_losses.append(reference.item())
gathered = {name: p.full_tensor() for name, p in sharded.named_parameters()}
differences = [(gathered[name] - p).abs().max().item() for name, p in whole.named_parameters()]
report = dict(rank=rank, world=world, shapes=shapes, plain=plain, max_difference=max(differences), losses=losses,
              reference_losses=reference_losses,
              names_equal=list(gathered) == [name for name, _ in whole.named_parameters()])
open(f"{sys.argv[1]}/rank-{rank}.json", "w").write(json.dumps(report))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fully_shard_on_two_cpu_processes_shards_our_unet_and_matches_unsharded_adamw(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(SHARDING_WORKER)
    command = [TORCHRUN, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path), json.dumps(TINY_UNET)]
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    # Judge by the files the ranks wrote: a torch.distributed teardown can abort after the work is done.
    reports = [tmp_path / f"rank-{rank}.json" for rank in range(2)]
    assert all(path.exists() for path in reports), f"torchrun exited with {result.returncode}:\n{result.stderr[-4000:]}"
    ranks = [json.loads(path.read_text()) for path in reports]
    for report in ranks:
        assert report["world"] == 2 and report["plain"] == [] and report["names_equal"]
        # Every parameter is a DTensor sharded on its first dimension: each rank holds half the rows (an odd count
        # leaves rank 0 the extra row).
        for name, (local, full) in report["shapes"].items():
            assert local[1:] == full[1:], name
            assert local[0] == (full[0] + 1 - report["rank"]) // 2, (name, local, full)
        # Three AdamW steps at lr 1e-3: the gathered weights are the unsharded run's within 2e-4, a fifth of a step
        # (AdamW divides each gradient by its own running RMS, so where a gradient is near zero the float32 rounding
        # of a different reduction order is magnified up to the step size; 1.2e-4 was measured).
        assert report["max_difference"] <= 2e-4, report["max_difference"]
    # At every step the mean of the ranks' losses on their halves is the unsharded loss on the whole batch.
    for step, reference in enumerate(ranks[0]["reference_losses"]):
        mean = (ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2
        assert abs(mean - reference) <= 1e-5 * abs(reference), (step, mean, reference)
    weight = "down_blocks.0.resnets.0.conv1.weight"
    assert ranks[0]["shapes"][weight] == [[16, 32, 3, 3], [32, 32, 3, 3]]
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank trained on its own half of the batch
