"""Shared fixtures: the real ComfyUI host (booted once per session) and tiny checkpoints.

Tests that need the host use the ``host`` fixture (or one built on it); without a host they skip with
the reason, which ``pytest_report_header`` also prints at the top of every run.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_host  # noqa: E402

_LOCATION = comfy_host.find_host()


def pytest_report_header(config):
    if _LOCATION:
        return f"ComfyUI host: {_LOCATION.path} (found via {_LOCATION.how}); pack: {comfy_host.PACK_DIR}"
    return f"ComfyUI host: none — host tests will be SKIPPED: {_LOCATION.how}"


@pytest.fixture(scope="session")
def host_location():
    return _LOCATION


@pytest.fixture(scope="session")
def host():
    """The booted in-process ComfyUI (CPU) with the pack loaded; skips when there is no host.
    Booted once per session (possibly already at collection, for parametrizing over host lists)."""
    if not _LOCATION:
        pytest.skip(_LOCATION.how)
    return comfy_host.session_host()


def pytest_unconfigure(config):
    comfy_host.cleanup()


@pytest.fixture(scope="session")
def sd15_unet_name(host):
    """File name (in the host's diffusion_models folder list) of a tiny SD1.5-layout UNet, fp32."""
    name = "d2f_test_tiny_sd15_unet.safetensors"
    comfy_host.save_safetensors(comfy_host.tiny_unet_state_dict(comfy_host.SD15_UNET_CONFIG, "SD15", seed=0),
                                os.path.join(host.unet_dir, name))
    return name


@pytest.fixture(scope="session")
def sd15_model(host, sd15_unet_name):
    """The tiny SD1.5 UNet loaded by the real UNETLoader node (ε-prediction, as detected)."""
    return host.run1("UNETLoader", unet_name=sd15_unet_name, weight_dtype="default")


@pytest.fixture(scope="session")
def sdxl_unet_name(host):
    """File name of a tiny SDXL-detected UNet (fp16 on disk)."""
    import torch

    name = "d2f_test_tiny_sdxl_unet.safetensors"
    sd = comfy_host.tiny_unet_state_dict(comfy_host.SDXL_UNET_CONFIG, "SDXL", seed=2, dtype=torch.float16)
    comfy_host.save_safetensors(sd, os.path.join(host.unet_dir, name))
    return name


# ---------------------------------------------------------------------------------------------
# measured differences, printed in the terminal summary (also with -q)
# ---------------------------------------------------------------------------------------------
_MEASURED: list[tuple[str, float, str]] = []


@pytest.fixture
def record_measure(request):
    """record_measure(what, value, bound_text): keep a measured number for the run's summary."""
    def record(what: str, value: float, bound: str = ""):
        _MEASURED.append((f"{request.node.name}: {what}", float(value), bound))
    return record


def pytest_terminal_summary(terminalreporter):
    if not _MEASURED:
        return
    terminalreporter.section("Diff2Flow measured differences (max|a-b| / max|b|)")
    width = max(len(name) for name, _, _ in _MEASURED)
    for name, value, bound in _MEASURED:
        terminalreporter.write_line(f"{name:<{width}}  {value:.3g}  {bound}")
