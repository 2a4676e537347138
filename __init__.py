"""Diff2Flow Bridge: ComfyUI nodes that run legacy ε/v diffusion checkpoints as flow-matching models."""

import logging

WEB_DIRECTORY = "./web"

# The oldest ComfyUI the pack runs on, from ComfyUI's history: the V3 node API (comfy_api.latest with
# io.ComfyNode) arrived in v0.3.48, inputs with ``advanced=`` in v0.10.0, io.Schema's
# ``has_intermediate_output`` in v0.19.0, and ModelPatcher.clone(force_deepcopy=…), with which D2FTrain
# trains a private copy of the model, in v0.25.0. Also in pyproject.toml ([tool.comfy] requires-comfyui).
MINIMUM_COMFYUI = "0.25.0"


class HostTooOldError(ImportError):
    """The ComfyUI loading this pack lacks the V3 node API (or the parts of it the pack uses)."""


def _host_version() -> str:
    try:
        from comfyui_version import __version__
    except ImportError:
        return "unknown"
    return f"v{__version__}"


def _too_old(what: str) -> HostTooOldError:
    return HostTooOldError(
        f"Diff2Flow Bridge needs ComfyUI v{MINIMUM_COMFYUI} or newer; this ComfyUI ({_host_version()}) {what}. "
        "Update ComfyUI (git pull, or the Manager's 'Update ComfyUI'); until then the pack offers no nodes.")


def check_host() -> None:
    """Raise HostTooOldError, naming the minimum version, when the host lacks what the nodes use.

    Only a missing ``comfy_api`` module or name counts: any other ImportError (a missing dependency, a bug)
    propagates unchanged, so ComfyUI's import-failure report shows its real cause.
    """
    try:
        from comfy_api.latest import io
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "comfy_api":
            raise
        raise _too_old(f"has no V3 node API ({exc})") from exc
    import dataclasses
    import inspect

    missing = []
    if not hasattr(io, "ComfyNode"):
        missing.append("io.ComfyNode")
    elif "has_intermediate_output" not in {f.name for f in dataclasses.fields(io.Schema)}:
        missing.append("io.Schema(has_intermediate_output=…)")
    elif "advanced" not in inspect.signature(io.Int.Input).parameters:
        missing.append("inputs with advanced=…")
    else:
        from comfy.model_patcher import ModelPatcher
        if "force_deepcopy" not in inspect.signature(ModelPatcher.clone).parameters:
            missing.append("ModelPatcher.clone(force_deepcopy=…)")
    if missing:
        raise _too_old(f"lacks {', '.join(missing)}")


# ComfyUI imports this folder as a package. Test runners may import this file on its own (no parent
# package, e.g. from a checkout whose folder name is not an identifier), or as a package with no ComfyUI
# anywhere: then there are no nodes to offer, and that is not an error. As a package, a host too old for the pack is reported loudly (logged, and
# raised so that ComfyUI lists the pack as failed to import, with this message), never silently empty.
def _inside_comfyui() -> bool:
    """Whether a ComfyUI is importable at all (its core ``comfy`` package and ``folder_paths``). A package
    import with none (pytest collecting a checkout whose folder name is an identifier, a packaging tool) is
    not a host to report on; a ComfyUI, however old, always has both."""
    import importlib.util
    try:
        return all(importlib.util.find_spec(m) is not None for m in ("comfy", "folder_paths"))
    except ImportError:
        return False


if __package__ and _inside_comfyui():
    try:
        check_host()
    except HostTooOldError as exc:
        logging.getLogger(__name__).error("%s", exc)
        raise
    from .nodes import comfy_entrypoint

__all__ = ["WEB_DIRECTORY", "MINIMUM_COMFYUI", "comfy_entrypoint"]
