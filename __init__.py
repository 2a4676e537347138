"""Diff2Flow Bridge: ComfyUI nodes that run legacy ε/v diffusion checkpoints as flow-matching models."""

WEB_DIRECTORY = "./web"

try:  # loaded by ComfyUI as a package
    from .nodes import comfy_entrypoint
except ImportError as exc:  # imported outside a ComfyUI host (e.g. by pytest's rootdir collection)
    if "comfy" not in str(exc):
        raise

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
