"""`d2f demo --quick` end to end, in process: the CLI runs, writes a valid PNG grid and results.json,
native DDIM equals the zero-shot flow Euler sampler to float error (DESIGN §2), and the fine-tuned rows
(Diff2Flow fine-tune, + scheduled sampling, + Reflow through the Trainer) are trained, sampled and scored."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from d2f_app import cli
from d2f_app.datasets import digits_tensor, load_digits
from d2f_core.flow.bridge import FlowBridge, flow_sigma, vp_scale
from d2f_app.demo import FINETUNE_ROWS, FLOW, NATIVE, reflow_couplings, simple_labels, unconditional_data
from d2f_app.metrics import PixelPCAFrechet, RandomConvFrechet, frechet_distance
from d2f_core.flow.schedule import DiscreteSchedule
from d2f_app.tiny_unet import TinyUNet
from d2f_app.png import image_grid


def test_quick_demo(tmp_path, capsys):
    rc = cli.main(["demo", "--quick", "--out", str(tmp_path)])
    assert rc == 0
    png = tmp_path / "grid.png"
    with Image.open(png) as img:
        assert img.format == "PNG"
        img.load()  # decodes every chunk: a broken file raises here
        width, height = img.size

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["grid_png"] == str(png)
    steps = results["config"]["sample_steps"]
    assert {(e["model"], e["steps"]) for e in results["equivalence"]} == {(m, s) for m in ("eps", "v") for s in steps}
    # The bridge is an exact change of coordinates: fp32 agreement at rounding level, fp64 to ~1e-14.
    assert results["max_abs_diff"] < 1e-4
    assert max(e["max_abs_diff_fp64"] for e in results["equivalence"]) < 1e-10
    for row in results["table"]:
        assert np.isfinite(row["fd"]) and np.isfinite(row["fd_random_conv"])
    # Every (model, method) row has every step count: 2 native samplers + the fine-tuned rows.
    methods = [NATIVE, FLOW] + [row for row, _ in FINETUNE_ROWS]
    fd = {(r["model"], r["sampler"], r["steps"]): r["fd"] for r in results["table"]}
    assert set(fd) == {(m, meth, s) for m in ("eps", "v") for meth in methods for s in steps}
    assert {r["solver"] for r in results["table"] if r["sampler"] not in (NATIVE,)} == {"flow Euler"}
    # Same network, same noise, same labels: both samplers score the same to float error.
    for (model, sampler, s), value in fd.items():
        if sampler == FLOW:
            assert value == pytest.approx(fd[(model, NATIVE, s)], rel=1e-3, abs=1e-4)
    # The fine-tunes really trained (through the Trainer) and changed the model.
    for model in ("eps", "v"):
        stats = results["finetune"][model]
        assert set(stats) == {row for row, _ in FINETUNE_ROWS}
        assert all(s["steps"] >= 1 and np.isfinite(s["final_loss"]) for s in stats.values())
        assert any(fd[(model, row, s)] != fd[(model, FLOW, s)] for row, _ in FINETUNE_ROWS for s in steps)
    assert all(f"| {meth}" in results["table_markdown"] for meth in methods)
    # One grid row per (model, method, steps), plus the real digits.
    assert height > len(fd) * 16
    # Each phase's time is printed as it ends, then the total; results.json keeps them.
    out = capsys.readouterr().out
    phases = results["phase_seconds"]
    assert {"training eps-model", "training v-model", "sampling and scoring", "tables", "grid"} <= set(phases)
    assert all(f"[time] {name}: " in out for name in phases)
    assert out.index("[time] training eps-model") < out.index("[time] sampling and scoring") < out.index("[time] grid")
    assert f"[time] total: {results['wall_seconds']:.1f} s" in out
    assert sum(phases.values()) <= results["wall_seconds"]


def test_reflow_couplings_pass_through_the_start_state():
    """ε' makes the straight line (1-σ)·x̂0 + σ·ε' pass through the sampler's start D(σ_0)·ε at σ_0."""
    torch.manual_seed(0)
    bridge = FlowBridge(DiscreteSchedule.stable_diffusion(), "eps")
    net = TinyUNet(1, channels=(8, 8)).eval()
    noise = torch.randn(3, 1, 8, 8)
    x0_hat, coupled = reflow_couplings(net, bridge, noise, solver_steps=2)
    sigma0 = flow_sigma(bridge.schedule.sigmas[simple_labels(2)[0]])
    start = (1 - sigma0) * x0_hat.double() + sigma0 * coupled.double()
    assert torch.allclose(start, vp_scale(sigma0) * noise.double(), atol=1e-5)
    x0_raw, raw = reflow_couplings(net, bridge, noise, solver_steps=2, through_start=False)
    assert torch.equal(raw, noise) and torch.equal(x0_raw, x0_hat)
    data = unconditional_data(x0_hat, coupled)  # an unconditional coupling set: one empty cond per pair
    x0, cond, nz = data.sample(0, 2, torch.Generator().manual_seed(0))
    assert cond == {} and nz.shape == x0.shape


def test_grid_has_labels_and_exact_tiles():
    """Each row: its label drawn left of the images, then the images enlarged without interpolation."""
    tiles = (np.arange(2 * 3 * 4, dtype=np.uint8) * 10).reshape(2, 3, 4)
    plain = np.asarray(image_grid([tiles, tiles], pad=2, scale=2))
    labelled = np.asarray(image_grid([tiles, tiles], ["eps FLOW 4", "v D2F 25"], pad=2, scale=2))
    label_w = labelled.shape[1] - plain.shape[1]
    assert plain.shape == (2 * (6 + 2) + 2, 2 * (8 + 2) + 2) and label_w > 20
    assert (labelled[:, :label_w] > 128).any()  # ink of the labels
    assert np.array_equal(labelled[:, label_w:], plain)
    assert np.array_equal(plain[2:8, 2:10], tiles[0].repeat(2, 0).repeat(2, 1))


def test_embedded_digits():
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 16
    assert sorted(set(labels.tolist())) == list(range(10))
    x, _ = digits_tensor(16)
    assert x.shape == (1797, 1, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_simple_labels_match_host_simple_scheduler():
    assert simple_labels(1) == [999]
    assert simple_labels(4) == [999, 749, 499, 249]
    assert simple_labels(50)[-1] == 19 and len(set(simple_labels(1000))) == 1000


def test_frechet_distance_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64)
    b = torch.randn(20000, 3, generator=g, dtype=torch.float64) * 2 + 1
    # N(0, I) vs N(1, 4I) in 3 dims: 3·1² + 3·(1 + 4 - 2·2) = 6.
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.05)
    assert abs(frechet_distance(a, a)) < 1e-8
    x, _ = digits_tensor(16)
    metric = PixelPCAFrechet(x[:1000], 8)
    assert metric.features(x[:5]).shape == (5, 8) and 0 < metric.explained < 1
    conv = RandomConvFrechet(x[:1000], dim=16)
    f = conv.features(x[:1000])
    assert f.shape == (1000, 16) and torch.allclose(f.std(0), torch.ones(16, dtype=torch.float64))
    # A fixed space: the same seed gives the same numbers; real vs real is far below real vs noise.
    assert torch.allclose(RandomConvFrechet(x[:1000], dim=16).features(x[:5]), f[:5], rtol=1e-9, atol=1e-9)
    assert conv.distance(x[:500], x[500:1000]) < 0.2 * conv.distance(x[:500], torch.rand_like(x[:500]) * 2 - 1)
