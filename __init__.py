"""Diff2Flow Bridge: ComfyUI nodes that run legacy ε/v diffusion checkpoints as flow-matching models."""

WEB_DIRECTORY = "./web"

# ComfyUI imports this folder as a package. Test runners may import this file on its own (no parent
# package, e.g. from a checkout whose folder name is not an identifier) or without a host: then there
# are no nodes to offer, and that is not an error.
if __package__:
    try:
        from .nodes import comfy_entrypoint
    except ImportError as exc:
        if "comfy" not in str(exc):
            raise

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
