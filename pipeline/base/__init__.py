"""The base models: loading and checking base CLIP, base SD and the vision tower."""
