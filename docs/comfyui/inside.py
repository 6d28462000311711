# ruff: noqa: E402, I001
# Run as written on the machine of the record (docs/comfyui/README.md): paths are that machine's.
"""The nodes inside ComfyUI's own Python objects (run in /work/comfyui-run with PYTHONPATH=.)."""

import json
import subprocess
import sys
import warnings
from pathlib import Path
from safetensors.torch import load_file

sys.argv = ["main.py", "--cpu"]
import comfy.options

comfy.options.enable_args_parsing()
import comfy.sd
import comfy.sampler_helpers
import comfyui_version
import nodes as comfy_nodes

REPO = Path("/work/wt/comfy")
RUN = Path("/work/comfyui-run")
commit = subprocess.run(
    ["git", "-C", "/work/.mirror/Comfy-Org+ComfyUI/repo", "rev-parse", "HEAD"],
    capture_output=True,
    text=True,
).stdout.strip()
report = {"comfyui_version": comfyui_version.__version__, "comfyui_commit": commit}

# A. The world's SD and CLIP in ComfyUI's loaders.
unet = load_file(str(REPO / "models/world/sd/unet/diffusion_pytorch_model.safetensors"))
report["world_unet"] = repr(comfy.sd.load_diffusion_model_state_dict(unet))
try:
    comfy.sd.load_clip(
        [str(REPO / "models/world/sd/text_encoder/model.safetensors")],
        clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
    )
    report["world_clip"] = "loaded"
except Exception as err:  # noqa: BLE001
    report["world_clip"] = f"{type(err).__name__}: {str(err)[:300]}"

# B. ComfyUI's SD1 CLIP at CLIP-L shape (random weights) and the nodes, against PromptEncoder.
sys.path.insert(0, str(RUN / "custom_nodes"))
from comfyui_deprojector import NODE_CLASS_MAPPINGS as N, nodes  # noqa: E402
from pipeline import PromptEncoder  # noqa: E402

clip = comfy.sd.load_clip(
    [str(RUN / "models/text_encoders/clip-l-random.safetensors")],
    clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
)
report["comfy_clip_class"] = type(clip.cond_stage_model).__name__
report["comfy_clip_dtype"] = str(next(clip.cond_stage_model.parameters()).dtype)
folder = RUN / "models/deprojectors/clip-l-vb"
loaded = nodes.load(folder)
encoder = PromptEncoder.from_pretrained(folder, images=False)
rows = []
for prompt in [
    "a red circle",
    "cat, maid",
    "red circle:1.2, blue square:-0.6, white background",
    "a cat (in a hat)",
]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cond, embeds = N["DeprojectText"]().encode(clip, loaded, prompt)
    ours = encoder.encode_prompt(prompt)
    reference = comfy_nodes.CLIPTextEncode().encode(
        clip, prompt.replace(":1.2", "").replace(":-0.6", "")
    )[0]
    rows.append(
        {
            "prompt": prompt,
            "states_max_abs_diff_vs_PromptEncoder": (cond[0][0] - ours).abs().max().item(),
            "pooled_max_abs_diff": (cond[0][1]["pooled_output"] - encoder.embedding(prompt))
            .abs()
            .max()
            .item(),
            "shapes": [list(cond[0][0].shape), list(cond[0][1]["pooled_output"].shape)],
            "clip_text_encode_shapes": [
                list(reference[0][0].shape),
                list(reference[0][1]["pooled_output"].shape),
            ],
            "clip_text_encode_keys": sorted(reference[0][1]),
            "warnings": [str(w.message)[:120] for w in caught],
        }
    )
report["text"] = rows
# The reference path (no deprojector): ComfyUI's CLIPTextEncode vs our CLIP, same weights.
ref = comfy_nodes.CLIPTextEncode().encode(clip, "a red circle")[0]
report["clip_text_encode_vs_our_clip_states_max_abs_diff"] = (
    (ref[0][0] - encoder.encode_prompt("a red circle", deproject=False)).abs().max().item()
)
report["clip_text_encode_pooled_vs_our_pooled_max_abs_diff"] = (
    (ref[0][1]["pooled_output"] - encoder._encode("a red circle").pooled).abs().max().item()
)

a = N["DeprojectText"]().encode(clip, loaded, "a red circle")
b = N["DeprojectText"]().encode(clip, loaded, "a blue square")
mix = N["DeprojectorInterpolate"]().interpolate(loaded, a[1], b[1], 0.5, "slerp")
expected = encoder.interpolate(
    encoder.embedding("a red circle"), encoder.embedding("a blue square"), [0.5], True
)
report["slerp_max_abs_diff"] = (mix[0][0][0] - expected).abs().max().item()
# ComfyUI's own conditioning nodes and the samplers' conversion.
combined = comfy_nodes.ConditioningCombine().combine(mix[0], ref)[0]
area = comfy_nodes.ConditioningSetArea().append(combined, 64, 64, 0, 0, 1.0)[0]
timed = comfy_nodes.ConditioningSetTimestepRange().set_range(area, 0.0, 0.5)[0]
avg = comfy_nodes.ConditioningAverage().addWeighted(a[0], b[0], 0.5)[0]
converted = comfy.sampler_helpers.convert_cond(timed)
report["downstream"] = {
    "combined": len(combined),
    "converted_keys": sorted(converted[0]),
    "cross_attn_shapes": [list(c["cross_attn"].shape) for c in converted],
    "average_shape": list(avg[0][0].shape),
}
print(json.dumps(report, indent=1))
