"""CLIP Text Deprojector: one CLIP embedding back to the 77 hidden states SD is conditioned on.

The Python API (`PromptEncoder`, `ImagePart`) loads on first use, so the CLI starts without
importing what it does not need."""

_API = {"PromptEncoder": "pipeline.prompting.encoder", "ImagePart": "pipeline.prompting.encoder"}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
