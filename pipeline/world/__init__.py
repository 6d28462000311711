"""The embedded world: a small trained CLIP, Stable Diffusion and judge (see build.py)."""
