"""IP-Adapter on our pipelines through diffusers' `IPAdapterMixin`, against diffusers' pipelines.

A random IP-Adapter in the official single-file layout (`test_controlnet.write_ip_adapter`) is loaded into our
pipelines and into diffusers' of the same kind, on tiny components with the same weights (diffusers' own models, and
our twins); `ip_adapter_image_embeds` or, with a tiny transformers `CLIPVisionModelWithProjection` saved as the
adapter's image encoder, `ip_adapter_image`. Tolerance: max |ours − diffusers| <= 1e-4 on `output_type="np"` images.
"""

import copy

import numpy as np
import pytest
import torch
from _tiny import sd_ddim, tiny_components
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from test_controlnet import IMAGE_EMBED_DIM, write_ip_adapter
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from hf_scratch import (
    ScratchStableDiffusionControlNetPipeline,
    ScratchStableDiffusionImg2ImgPipeline,
    ScratchStableDiffusionInpaintPipeline,
    ScratchStableDiffusionPipeline,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOLERANCE = 1e-4
SIZE = 32
NO_SAFETY_CHECKER = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
WEIGHTS = dict(subfolder="models", weight_name="ip-adapter_sd15.safetensors")
CONDITION = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
MASK = torch.zeros(1, 1, SIZE, SIZE)
MASK[..., 8:20, 8:24] = 1
# kind: (ours, diffusers', inputs beyond the prompt)
KINDS = {
    "text_to_image": (ScratchStableDiffusionPipeline, StableDiffusionPipeline, {"height": SIZE, "width": SIZE}),
    "image_to_image": (ScratchStableDiffusionImg2ImgPipeline, StableDiffusionImg2ImgPipeline,
                       {"image": CONDITION, "strength": 0.75}),
    "inpaint": (ScratchStableDiffusionInpaintPipeline, StableDiffusionInpaintPipeline,
                {"image": CONDITION, "mask_image": MASK, "height": SIZE, "width": SIZE}),
    "controlnet": (ScratchStableDiffusionControlNetPipeline, StableDiffusionControlNetPipeline, {"image": CONDITION}),
}  # fmt: skip


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory):
    """The IP-Adapter weights in `models/`, and a tiny CLIP image encoder in `models/image_encoder/`."""
    folder = tmp_path_factory.mktemp("ip_adapter")
    write_ip_adapter(folder, tiny_components("diffusers")["unet"])
    torch.manual_seed(2)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=SIZE, patch_size=8, projection_dim=IMAGE_EMBED_DIM)  # fmt: skip
    CLIPVisionModelWithProjection(vision).eval().save_pretrained(folder / "models" / "image_encoder")
    return folder


def controlnet_for(unet) -> ControlNetModel:
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in controlnet.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return controlnet.eval()


def generate(pipeline_class, components: dict, kind: str, folder, encoder: bool, **call) -> np.ndarray:
    components = copy.deepcopy(components)  # loading an IP-Adapter changes the U-Net
    extra = {} if pipeline_class.__module__.startswith("hf_scratch") else NO_SAFETY_CHECKER
    if kind == "controlnet":
        extra = {**extra, "controlnet": controlnet_for(tiny_components("diffusers")["unet"])}
    pipe = pipeline_class(**components, **extra, scheduler=sd_ddim())
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.load_ip_adapter(folder, **WEIGHTS, image_encoder_folder="image_encoder" if encoder else None)
        pipe.set_ip_adapter_scale(0.7)
    inputs = KINDS[kind][2]
    return pipe("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np",
                **inputs, **call).images  # fmt: skip


def embeds() -> list[torch.Tensor]:
    return [torch.randn(2, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(5))]  # [uncond; cond]


@pytest.mark.parametrize("kind", KINDS)
def test_ip_adapter_embeds_give_diffusers_images(kind, adapter_folder):
    ours, reference, _ = KINDS[kind]
    call = {"ip_adapter_image_embeds": embeds()}
    expected = generate(reference, tiny_components("diffusers"), kind, adapter_folder, False, **call)
    plain = generate(ours, tiny_components("diffusers"), kind, None, False)
    assert np.abs(expected - plain).max() > 0.01  # the image tokens change the image
    for components in (tiny_components("diffusers"), tiny_components("scratch")):
        actual = generate(ours, components, kind, adapter_folder, False, **call)
        assert np.abs(actual - expected).max() <= TOLERANCE


@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
def test_ip_adapter_image_through_the_loaded_image_encoder_gives_diffusers_images(adapter_folder, guidance_scale):
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(6))  # the encoder's pixel values
    call = {"ip_adapter_image": image, "guidance_scale": guidance_scale}
    expected = generate(StableDiffusionPipeline, tiny_components("diffusers"), "text_to_image", adapter_folder, True,
                        **call)  # fmt: skip
    actual = generate(ScratchStableDiffusionPipeline, tiny_components("scratch"), "text_to_image", adapter_folder, True,
                      **call)  # fmt: skip
    assert np.abs(actual - expected).max() <= TOLERANCE


def test_unload_restores_the_plain_pipeline(adapter_folder):
    pipe = ScratchStableDiffusionPipeline(**tiny_components("scratch"), scheduler=sd_ddim())
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a cat", num_inference_steps=3, output_type="np")
    before = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.load_ip_adapter(adapter_folder, **WEIGHTS, image_encoder_folder="image_encoder")
    assert pipe.image_encoder is not None and "image_encoder" in pipe.config
    pipe.unload_ip_adapter()
    assert pipe.image_encoder is None and pipe.unet.encoder_hid_proj is None
    after = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(after - before).max() <= TOLERANCE


def test_ip_adapter_inputs_without_an_adapter_or_encoder_are_refused(adapter_folder):
    pipe = ScratchStableDiffusionPipeline(**tiny_components("scratch"), scheduler=sd_ddim())
    with pytest.raises(ValueError, match="load_ip_adapter"):
        pipe("a cat", num_inference_steps=2, ip_adapter_image_embeds=embeds())
    pipe.load_ip_adapter(adapter_folder, **WEIGHTS, image_encoder_folder=None)
    with pytest.raises(ValueError, match="image encoder"):
        pipe("a cat", num_inference_steps=2, ip_adapter_image=CONDITION)
    with pytest.raises(ValueError, match="at most one"):
        pipe("a cat", num_inference_steps=2, ip_adapter_image=CONDITION, ip_adapter_image_embeds=embeds())
