"""The memory pre-flight's engine (d2f_core/training/memory.py): the estimate's algebra, the counts it reads
from a module tree, the gradient_checkpointing decision with injected free-memory values, the refusal and its
suggestions. Host-free, CPU, no tensor allocated for the big numbers."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from d2f_core.training import memory as M  # noqa: E402
from d2f_core.training.adapters import LoraAdapters, attention_only  # noqa: E402

GiB = M.GiB

# SD1.5's counts (the real architecture's, read by network_facts from a meta-device UNet: see bench_memory.py)
SD15 = M.NetworkFacts(params=859_520_964, stored_bytes=1_719_041_928, outside_blocks=54_611_204,
                      largest_block=49_164_800, lora_params=423_936, lora_tokens=65.78125, lora_context_layers=32)
SD15_ALL = replace(SD15, lora_params=1_058_216, lora_tokens=95.734375)  # lora_targets all
SDXL = M.NetworkFacts(params=2_567_463_684, stored_bytes=5_134_927_368, outside_blocks=30_362_884,
                      largest_block=350_840_320, lora_params=2_659_840, lora_tokens=53.25, lora_context_layers=140)


def est(facts=SD15, family="sd15", **settings):
    return M.estimate(facts, M.RunSettings(**settings), family)


# ---------------------------------------------------------------------------------------------------------------
# the algebra
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_monotone_in_batch_resolution_and_rank(mode, ckpt):
    base = dict(mode=mode, checkpointing=ckpt)
    batches = [est(batch_size=b, **base).total for b in (1, 2, 4, 8, 16)]
    assert batches == sorted(batches) and len(set(batches)) == len(batches)
    sides = [est(shapes=((s, s),), **base).total for s in (32, 48, 64, 96, 128)]
    assert sides == sorted(sides) and len(set(sides)) == len(sides)
    ranks = [est(rank=r, **base).total for r in (1, 4, 16, 64, 256)]
    if mode == "lora":
        assert ranks == sorted(ranks) and len(set(ranks)) == len(ranks)
    else:  # a full fine-tune has no rank
        assert len(set(ranks)) == 1


def test_activations_scale_with_batch_times_pixels():
    one = est(batch_size=1, shapes=((64, 64),)).terms["activations"]
    assert est(batch_size=4, shapes=((64, 64),)).terms["activations"] == pytest.approx(4 * one, rel=1e-9)
    assert est(batch_size=1, shapes=((128, 128),)).terms["activations"] == pytest.approx(4 * one, rel=0.01)


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("facts,family", [(SD15, "sd15"), (SDXL, "sdxl")])
def test_checkpointing_lowers_activations(mode, facts, family):
    for b in (1, 4):
        off = est(facts, family, mode=mode, batch_size=b, checkpointing=False)
        on = est(facts, family, mode=mode, batch_size=b, checkpointing=True)
        assert on.terms["activations"] < off.terms["activations"] / 3
        assert on.total < off.total
        changed = ("activations", "weight casts", "gradients")  # D2FTrain captures no CUDA graph with it on
        assert {k: v for k, v in on.terms.items() if k not in changed} == \
            {k: v for k, v in off.terms.items() if k not in changed}
        P = facts.params if mode == "full" else 16 * facts.lora_params
        assert off.terms["gradients"] - on.terms["gradients"] == 4 * P


@pytest.mark.parametrize("ckpt", [False, True])
def test_full_needs_more_than_lora(ckpt):
    for targets in ("attention", "all"):
        lora = est(mode="lora", lora_targets=targets, checkpointing=ckpt)
        full = est(mode="full", checkpointing=ckpt)
        assert full.total > lora.total + 14 * SD15.params  # masters, gradients, Adam: 16 bytes per weight at least
    assert est(mode="lora", lora_targets="all").total > est(mode="lora", lora_targets="attention").total


def test_terms_follow_the_documented_equations():
    """W = N·s_w; S = P·(4 + 4 + 8) + 4P per graph + LoRA snapshots 2·4P; casts only for a bf16 full fine-tune."""
    e = est(mode="lora", rank=16, batch_size=2, cuda_graphs=True, checkpointing=False)
    P = 16 * SD15.lora_params
    assert e.terms["weights"] == 2 * SD15.params
    assert (e.terms["trained"], e.terms["optimizer"], e.terms["gradients"]) == (4 * P, 8 * P, 8 * P)
    assert e.terms["snapshots"] == 8 * P and e.terms["weight casts"] == 0 and e.terms["ema"] == 0
    a_off, _ = M.FAMILY_ACTIVATIONS["sd15"]
    rank_term = 2 * 16 * (SD15.lora_tokens * 64 * 64 + SD15.lora_context_layers * 77)
    assert e.terms["activations"] == int(2 * (64 * 64 * a_off + rank_term))
    assert e.total == e.train_peak == sum(e.terms.values())

    full = est(mode="full", checkpointing=True, cuda_graphs=False, ema_bytes=4)
    N = SD15.params
    assert (full.terms["trained"], full.terms["gradients"], full.terms["optimizer"], full.terms["ema"]) == \
        (4 * N, 4 * N, 8 * N, 4 * N)
    assert full.terms["snapshots"] == 0  # in host memory
    assert full.terms["weight casts"] == 2 * (SD15.outside_blocks + SD15.largest_block)
    assert est(mode="full", checkpointing=False).terms["weight casts"] == 2 * N
    assert est(mode="full", weight_bytes=4).terms["weight casts"] == 0  # fp32: no autocast copies
    assert est(optimizer="sgd").terms["optimizer"] == 4 * 16 * SD15.lora_params
    assert est(world_size=2).terms["gradients"] == est().terms["gradients"] + 4 * 16 * SD15.lora_params


def test_every_captured_graph_keeps_its_own_pool():
    """With CUDA graphs each bucket shape (up to 4) holds its activations and gradient outputs; eager: the largest."""
    one = est(shapes=((64, 64),), cuda_graphs=True)
    two = est(shapes=((64, 64), (48, 48)), cuda_graphs=True)
    eager_two = est(shapes=((64, 64), (48, 48)), cuda_graphs=False)
    a64 = M.activation_bytes(SD15, M.RunSettings(), "sd15", 64 * 64)
    a48 = M.activation_bytes(SD15, M.RunSettings(), "sd15", 48 * 48)
    assert two.terms["activations"] == int(a64 + a48) and eager_two.terms["activations"] == int(a64)
    assert two.terms["gradients"] - one.terms["gradients"] == 4 * 16 * SD15.lora_params
    six = est(shapes=tuple((s, s) for s in (64, 60, 56, 52, 48, 44)), cuda_graphs=True)
    expected = sum(M.activation_bytes(SD15, M.RunSettings(), "sd15", s * s) for s in (64, 60, 56, 52)) \
        + M.activation_bytes(SD15, M.RunSettings(), "sd15", 48 * 48)
    assert six.terms["activations"] == int(expected)


def test_no_graph_terms_with_checkpointing_unless_graphs_replay_with_it():
    on = est(checkpointing=True, shapes=((64, 64), (48, 48)))
    assert on.terms["gradients"] == 4 * 16 * SD15.lora_params  # the persistent gradients only
    assert on.terms["activations"] == int(M.activation_bytes(SD15, M.RunSettings(checkpointing=True), "sd15", 64 * 64))
    graphed = est(checkpointing=True, shapes=((64, 64), (48, 48)), graphs_with_checkpointing=True)
    assert graphed.terms["gradients"] == 3 * 4 * 16 * SD15.lora_params and graphed.total > on.total


def test_fp32_doubles_weights_and_activations():
    bf16, fp32 = est(weight_bytes=2), est(weight_bytes=4)
    assert fp32.terms["weights"] == 2 * bf16.terms["weights"]
    assert fp32.terms["activations"] == pytest.approx(2 * bf16.terms["activations"], rel=1e-6)


def test_load_peak_counts_the_copy_as_loaded():
    fat = replace(SD15, stored_bytes=4 * SD15.params)  # an fp32 checkpoint trained in bf16
    e = M.estimate(fat, M.RunSettings(batch_size=1, checkpointing=True), "sd15")
    assert e.load_peak == 4 * SD15.params + int(M.C_OVERHEAD) and e.total == max(e.train_peak, e.load_peak)
    assert e.total == e.load_peak  # a small LoRA run peaks while the fp32 copy is loaded, before the cast


def test_families_and_fallback():
    assert M.family_of(["SD15", "BASE"]) == ("sd15", True, "SD15")
    assert M.family_of(["SSD1B", "SDXL", "BASE"]) == ("sdxl", False, "SSD1B")  # SDXL's constants, not measured
    assert M.family_of(["SDXL", "BASE"]) == ("sdxl", True, "SDXL")
    family, calibrated, _ = M.family_of(["PixArtSigma", "PixArtAlpha", "BASE"])
    assert family == M.FALLBACK_FAMILY and not calibrated
    assert M.estimate(SD15, M.RunSettings(), "no such family").family == M.FALLBACK_FAMILY


# ---------------------------------------------------------------------------------------------------------------
# counts read from the module tree
# ---------------------------------------------------------------------------------------------------------------
class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.op = nn.Conv2d(c, c, 3, stride=2, padding=1)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)


class Attn(nn.Module):
    def __init__(self, c, ctx):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = nn.Linear(c, c), nn.Linear(ctx, c), nn.Linear(ctx, c), nn.Linear(c, c)


class Block(nn.Module):
    def __init__(self, c, ctx):
        super().__init__()
        self.attn1, self.attn2 = Attn(c, c), Attn(c, ctx)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.grouped = nn.Conv2d(c, c, 3, padding=1, groups=2)


class ToyUNet(nn.Module):
    """UNet-shaped: two levels, a transformer-ish block at each, an MHA whose out_proj LoRA skips."""

    def __init__(self, c=8, ctx=6):
        super().__init__()
        self.conv_in = nn.Conv2d(4, c, 3, padding=1)
        self.input_blocks = nn.ModuleList([nn.Sequential(Block(c, ctx)), nn.Sequential(Downsample(c)),
                                           nn.Sequential(Block(c, ctx))])
        self.middle_block = nn.Sequential(Block(c, ctx))
        self.output_blocks = nn.ModuleList([nn.Sequential(Block(c, ctx), Upsample(c)), nn.Sequential(Block(c, ctx))])
        self.mha = nn.MultiheadAttention(c, 2)


@pytest.mark.parametrize("include", [None, attention_only])
@pytest.mark.parametrize("rank", [1, 4])
def test_lora_parameter_count_is_the_adapters(include, rank):
    net = ToyUNet().requires_grad_(False)
    adapters = LoraAdapters(net, rank=rank, include=include)
    assert M.lora_parameter_count(net, rank, include) == adapters.num_parameters
    facts = M.network_facts(net, include=include)
    assert facts.lora_params * rank == adapters.num_parameters


def test_token_fractions_follow_the_levels():
    net = ToyUNet()
    f = M.token_fractions(net)
    assert f["input_blocks.0.0.attn1.to_q"] == 1.0
    assert f["input_blocks.1.0.op"] == 1.0          # the downsampling conv reads the upper level
    assert f["input_blocks.2.0.attn1.to_q"] == 0.25
    assert f["middle_block.0.conv"] == 0.25
    assert f["output_blocks.0.0.conv"] == 0.25
    assert f["output_blocks.1.0.attn1.to_q"] == 1.0  # after the Upsample
    assert M.token_fractions(nn.Linear(2, 2)) == {}


def test_network_facts_counts():
    net = ToyUNet().half()
    blocks = [m for m in net.modules() if isinstance(m, Block)]
    facts = M.network_facts(net, blocks, attention_only)
    n = sum(p.numel() for p in net.parameters())
    assert facts.params == n and facts.stored_bytes == 2 * n
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    assert facts.outside_blocks == n - sum(sizes) and facts.largest_block == max(sizes)
    # attention_only keeps the attn* linears: per block 2 context layers (attn2.to_k/v) and 6 image-token ones
    levels = [1.0, 0.25, 0.25, 0.25, 1.0]  # the five Blocks' levels
    assert facts.lora_context_layers == 2 * len(blocks)
    assert facts.lora_tokens == pytest.approx(6 * sum(levels))


def test_data_bytes_and_shapes():
    conds = [{"context": torch.zeros(77, 768), "y": torch.zeros(16)} for _ in range(3)]
    buckets = [(torch.zeros(3, 4, 8, 8), conds), (torch.zeros(2, 4, 6, 10), conds[:2], torch.zeros(2, 4, 6, 10))]
    total, shapes = M.data_bytes(buckets, cond_bytes=2)
    assert shapes == [(8, 8), (6, 10)]
    assert total == 3 * 4 * 64 * 4 + 3 * (77 * 768 + 16) * 2 + 2 * 4 * 60 * 4 * 2 + 2 * (77 * 768 + 16) * 2


# ---------------------------------------------------------------------------------------------------------------
# the decision
# ---------------------------------------------------------------------------------------------------------------
def plan(available, choice="auto", family="sd15", **settings):
    s = M.RunSettings(**{"batch_size": 4, "shapes": ((64, 64),), **settings})
    return M.preflight(lambda targets: SD15 if targets == "attention" else SD15_ALL, s, choice, available, family)


def test_legacy_booleans_and_choices():
    assert M.checkpointing_choice(True) == "on" and M.checkpointing_choice(False) == "off"
    assert [M.checkpointing_choice(v) for v in ("auto", "on", "off", " ON ", "true", "false")] == \
        ["auto", "on", "off", "on", "on", "off"]
    for bad in ("sometimes", 1, None, 0.5):
        with pytest.raises(ValueError, match="gradient_checkpointing must be one of auto, on, off"):
            M.checkpointing_choice(bad)
    assert plan(None, True).checkpointing and not plan(None, False).checkpointing


def test_auto_turns_checkpointing_on_only_when_needed():
    off, on = plan(None).without.total, plan(None).with_.total
    assert on < off
    roomy = plan(100 * GiB)
    assert not roomy.checkpointing and roomy.refusal is None
    just_enough_off = math.ceil(off * (1 + M.SAFETY) + M.RESERVE)
    assert not plan(just_enough_off).checkpointing
    assert plan(just_enough_off - 1).checkpointing            # the margin: off must fit with it
    tight = plan(on + 1)                                      # only checkpointing fits
    assert tight.checkpointing and tight.refusal is None and tight.estimate is tight.with_
    assert plan(on - 1).refusal                              # not even with it


def test_cpu_never_refuses_and_auto_means_off():
    p = plan(None, batch_size=256, shapes=((512, 512),))
    assert not p.checkpointing and p.refusal is None
    assert "no device limit known" in p.summary()


def test_explicit_choices_are_kept():
    assert plan(100 * GiB, "on").checkpointing
    p = plan(plan(None).with_.total + 1, "off")               # off does not fit, on would: refused, says so
    assert not p.checkpointing and p.refusal and "gradient_checkpointing auto or on" in p.refusal


def test_refusal_names_the_settings_that_fit():
    on4 = plan(None).with_
    available = int(on4.total - 0.5 * (on4.terms["activations"]))     # batch 4 too large, smaller batches fit
    p = plan(available)
    assert p.refusal and p.checkpointing
    msg = p.refusal
    assert f"{on4.total / GiB:.1f} GiB" in msg and f"{available / GiB:.1f} GiB are available" in msg
    assert "before loading the model" in msg
    b = int(msg.split("batch_size ")[1].split(" ")[0])
    assert 1 <= b < 4
    assert plan(available, batch_size=b).refusal is None and plan(available, batch_size=b + 1).refusal
    assert "lower resolution" in msg
    assert "checkpointing" in msg  # the estimate says with which setting


def test_refusal_full_mode_suggests_lora_and_rank_for_lora():
    big = plan(None, mode="full").with_
    p = plan(int(big.total * 0.5), mode="full", ema_bytes=4)
    assert p.refusal and "mode lora" in p.refusal
    lora = plan(None, rank=512, lora_targets="all", batch_size=1).with_
    p = plan(int(lora.total - lora.terms["optimizer"] / 2), rank=512, lora_targets="all", batch_size=1)
    assert "rank " in p.refusal and "lora_targets attention" in p.refusal


def test_nothing_fits_says_so():
    p = plan(GiB // 2, batch_size=1)  # less than the weights
    assert p.refusal and "No lower setting fits" in p.refusal


def test_summary_and_describe():
    p = plan(100 * GiB)
    text = p.summary()
    assert "memory estimate" in text and "weights 1.60" in text and "100.0 GiB available" in text
    assert "gradient checkpointing off (auto" in text
    assert p.memory_required == p.estimate.total - SD15.stored_bytes
