"""ComfyUI custom nodes for CLIP text deprojectors (README.md beside this file).

Copy or symlink this folder into ComfyUI/custom_nodes; the project itself (the `pipeline`
package) must be installed into ComfyUI's Python: `pip install -e /path/to/the/repository`.
"""

try:
    import pipeline  # noqa: F401  (the project: models, grammar, formulas)
except ImportError as err:  # pragma: no cover - only outside a set-up ComfyUI
    raise ImportError(
        "the deprojector nodes need the clip-text-deprojector project in ComfyUI's Python: "
        "run `python -m pip install -e /path/to/clip-text-deprojector` with ComfyUI's python"
    ) from err

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_model_folder

register_model_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
