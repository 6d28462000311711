# ruff: noqa: E402, I001
# Run as written on the machine of the record (docs/comfyui/README.md): paths are that machine's.
"""DeprojectImage on CLIPVisionEncode's output (random ViT-L/14 weights) vs PromptEncoder."""

import json
import sys
from pathlib import Path
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.argv = ["main.py", "--cpu"]
import comfy.options

comfy.options.enable_args_parsing()
import comfy.clip_vision
import nodes as comfy_nodes
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

RUN = Path("/work/comfyui-run")
sys.path.insert(0, str(RUN / "custom_nodes"))
from comfyui_deprojector import NODE_CLASS_MAPPINGS as N, nodes  # noqa: E402
from pipeline.base.vision import ImageTower  # noqa: E402
from pipeline.prompting.encoder import bridged_image_embeds  # noqa: E402
from pipeline.world.embedded import World  # noqa: E402

torch.manual_seed(3)
config = CLIPVisionConfig(
    hidden_size=1024,
    intermediate_size=4096,
    projection_dim=768,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    hidden_act="quick_gelu",
)
vision = CLIPVisionModelWithProjection(config).eval()
file = Path("/work/comfyui-check/vit-l-random.safetensors")
save_file({k: v.contiguous() for k, v in vision.state_dict().items()}, str(file))
processor = CLIPImageProcessor(
    size={"shortest_edge": 224},
    crop_size={"height": 224, "width": 224},
    image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711],
)
tower = ImageTower(vision, processor)
comfy_vision = comfy.clip_vision.load(str(file))
loaded = nodes.load(RUN / "models/deprojectors/clip-l-vb")
scene = World.scene_for("red circle blue square white background", seed=0).resize(
    (256, 256), Image.NEAREST
)
pixels = torch.from_numpy(np.asarray(scene).astype(np.float32) / 255.0)[
    None
]  # ComfyUI IMAGE [B,H,W,C]
output = comfy_nodes.CLIPVisionEncode().encode(comfy_vision, pixels, "center")[0]
cond, embeds = N["DeprojectImage"]().encode(loaded, output, 1.0, "none")
ours_embeds = tower.embed([scene])
expected = loaded.model.generate(bridged_image_embeds(ours_embeds, loaded.model, None, "none"))
print(
    json.dumps(
        {
            "image_embeds_max_abs_diff": (output.image_embeds - ours_embeds).abs().max().item(),
            "image_embeds_norm": ours_embeds.norm().item(),
            "states_max_abs_diff_vs_PromptEncoder_path": (cond[0][0] - expected).abs().max().item(),
            "same_image_embeds_states_max_abs_diff": (
                N["DeprojectImage"]().encode(
                    loaded, type("O", (), {"image_embeds": ours_embeds})(), 1.0, "none"
                )[0][0][0]
                - expected
            )
            .abs()
            .max()
            .item(),
            "shapes": [list(cond[0][0].shape), list(cond[0][1]["pooled_output"].shape)],
        },
        indent=1,
    )
)
