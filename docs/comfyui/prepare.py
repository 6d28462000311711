# ruff: noqa: E402, I001
# Run as written on the machine of the record (docs/comfyui/README.md): paths are that machine's.
"""Random CLIP-L-shaped text model (HF layout + ComfyUI text_encoders file), a deprojector for it,
a random SD1.5-shaped UNet (ComfyUI diffusion_models file). Run in /work/comfyui-run."""

import sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizerFast

from pipeline.benchmarks.extraction import CLIP_L_TEXT  # openai/clip-vit-large-patch14's shape

sys.argv = ["main.py", "--cpu"]
import comfy.options

comfy.options.enable_args_parsing()
RUN = Path("/work/comfyui-run")
HF = Path("/work/comfyui-check/clip-l-random")
torch.manual_seed(0)
config = CLIPTextConfig(**CLIP_L_TEXT, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
model = CLIPTextModelWithProjection(config).eval()
model.save_pretrained(HF)
tok = CLIPTokenizerFast.from_pretrained(RUN / "comfy/sd1_tokenizer")
tok.save_pretrained(HF)
sd = {k: v.contiguous() for k, v in model.state_dict().items()}
(RUN / "models/text_encoders").mkdir(parents=True, exist_ok=True)
save_file(sd, str(RUN / "models/text_encoders/clip-l-random.safetensors"))

from pipeline.base.loaders import load_clip
from pipeline.data.extraction import compute_constants
from pipeline.models import build_deprojector

clip = load_clip(str(HF))
torch.manual_seed(1)
dep = build_deprojector("vicinity-batch", 768, 768, compute_constants(clip), vicinity=2).eval()
dep.config.base_clip = str(HF)
out = RUN / "models/deprojectors/clip-l-vb"
dep.save_pretrained(out)
print("deprojector", out)

# A random SD1.5-shaped UNet in ComfyUI's own layout (its SD15 model config).
import comfy.supported_models
import comfy.model_detection

unet_config = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
import comfy.ops

torch.manual_seed(2)
unet = UNetModel(**{k: v for k, v in unet_config.items()}, operations=comfy.ops.disable_weight_init)
for p in unet.parameters():
    torch.nn.init.normal_(p, std=0.02)
usd = {k: v.half().contiguous() for k, v in unet.state_dict().items()}
(RUN / "models/diffusion_models").mkdir(parents=True, exist_ok=True)
save_file(usd, str(RUN / "models/diffusion_models/sd15-random.safetensors"))
print("unet", sum(v.numel() for v in usd.values()))
