"""LoRA (bypass) and full fine-tune adapters on a frozen, shared module (d2f_core.training.adapters)."""

import copy
import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from d2f_core.training.adapters import FullAdapters, LoraAdapters, attention_only, merge_lora_into


class OpsLinear(nn.Linear):
    """Stands in for comfy.ops.*.Linear: a subclass, detected by isinstance."""


class OpsConv2d(nn.Conv2d):
    pass


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attn1 = nn.ModuleDict({"to_q": OpsLinear(c, c), "to_out": nn.Linear(c, c)})
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, t):
        t = t + self.attn1["to_out"](torch.tanh(self.attn1["to_q"](t)))
        return t + self.ff.net(t)


class Tiny(nn.Module):
    """Linear, Conv2d (k=3 stride 1 and 2, 1x1, reflect padding, dilation), a grouped conv, GroupNorm."""

    def __init__(self, c=8, inner_checkpoint=False):
        super().__init__()
        self.conv_in = OpsConv2d(3, c, 3, padding=1)
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(c, c, 3, padding=1, groups=4)
        self.reflect = nn.Conv2d(c, c, 3, padding=2, dilation=2, padding_mode="reflect")
        self.norm = nn.GroupNorm(4, c)
        self.proj_in = nn.Conv2d(c, c, 1)
        self.transformer_blocks = nn.ModuleList([Block(c)])
        self.head = nn.Linear(c, 5)
        self.inner_checkpoint = inner_checkpoint

    def forward(self, x):
        h = F.silu(self.conv_in(x))
        h = F.silu(self.down(h))
        h = self.reflect(self.grouped(h))
        h = self.proj_in(self.norm(h))
        t = h.flatten(2).transpose(1, 2)
        for blk in self.transformer_blocks:
            t = checkpoint(blk, t, use_reentrant=False) if self.inner_checkpoint else blk(t)
        return self.head(t)


CONVS = ["conv_in", "down", "reflect", "proj_in"]
LINEARS = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_out",
           "transformer_blocks.0.ff.net.0", "transformer_blocks.0.ff.net.2", "head"]


def make_base(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    base = Tiny(**kw).to(dtype)
    base.requires_grad_(False)  # as ComfyUI's BaseModel does for the diffusion model
    return base


def inputs(seed=1, n=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 12, 12, generator=g).to(dtype)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_untouched(module, snap):
    sd = module.state_dict()
    assert sd.keys() == snap.keys()
    for k, v in sd.items():
        assert v.dtype == snap[k].dtype and torch.equal(v, snap[k]), k
    for p in module.parameters():
        assert not p.requires_grad and p.grad is None


def train(adapters, x, steps=4, lr=1e-2):
    opt = torch.optim.Adam(adapters.parameters(), lr=lr)
    target = torch.randn_like(adapters(x), generator=torch.Generator().manual_seed(7))
    for _ in range(steps):
        opt.zero_grad()
        loss = (adapters(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
    return loss.item()


def randomize_up(lora, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in lora._named_trainables().items():
            if name.endswith("lora_up.weight"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def merged_lora_model(base, sd, prefix="diffusion_model."):
    """The base with the exported LoRA merged the way ComfyUI merges it."""
    merged = copy.deepcopy(base)
    for k in sd:
        if k.endswith(".lora_up.weight"):
            n = k[len(prefix):-len(".lora_up.weight")]
            m = merged.get_submodule(n)
            m.weight.data = merge_lora_into(m.weight.data, sd[k], sd[f"{prefix}{n}.lora_down.weight"],
                                            sd[f"{prefix}{n}.alpha"].item())
    return merged


def merged_diff_model(base, sd, prefix="diffusion_model."):
    """The base with exported diffs applied as ComfyUI's ("diff", (Δ,)) patches: W += Δ."""
    merged = copy.deepcopy(base)
    for k, d in sd.items():
        if k.endswith(".diff_b"):
            p = merged.get_parameter(k[len(prefix):-len(".diff_b")] + ".bias")
        else:
            name = k[len(prefix):-len(".diff")]
            p = merged.get_submodule(name).weight if name in dict(merged.named_modules()) \
                else merged.get_parameter(name)
        p.data = p.data + d.to(p.dtype)
    return merged


# ------------------------------------------------------------------------------------------- LoRA

def test_targets_subclasses_and_skips_grouped():
    lora = LoraAdapters(make_base(), rank=4)
    assert sorted(lora.names) == sorted(CONVS + LINEARS)
    assert lora.skipped == [("grouped", "grouped conv (groups=4)")]


def test_init_is_identity_and_base_untouched_after_training():
    base = make_base()
    snap = snapshot(base)
    x = inputs()
    ref = base(x)
    lora = LoraAdapters(base, rank=4)
    with lora.attached():
        assert torch.equal(lora(x), ref)  # up = 0: exactly the base at step 0
        train(lora, x)
        assert not torch.allclose(lora(x), ref)
    assert_untouched(base, snap)
    assert torch.equal(base(x), ref)


def test_gradients_flow_only_to_adapter_params():
    base = make_base()
    lora = LoraAdapters(base, rank=4)
    randomize_up(lora)
    with lora.attached():
        lora(inputs()).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.parameters())
    assert all(p.grad is None for p in base.parameters())


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_bypass_equals_comfy_merge_of_export(dtype, rtol):
    base = make_base(dtype=dtype)
    x = inputs(dtype=dtype)
    lora = LoraAdapters(base, rank=3, alpha=1.5, dtype=dtype)
    with lora.attached():
        train(lora, x, steps=3)
        randomize_up(lora)
        out = lora(x)
    merged = merged_lora_model(base, lora.export())
    torch.testing.assert_close(merged(x), out, rtol=rtol, atol=rtol * out.abs().max().item())
    # per layer too: Linear, strided/dilated/reflect-padded convs
    for name in ["down", "reflect", "conv_in", "transformer_blocks.0.ff.net.0"]:
        m, mm = base.get_submodule(name), merged.get_submodule(name)
        xin = torch.randn(2, m.in_channels, 9, 9, dtype=dtype) if isinstance(m, nn.Conv2d) \
            else torch.randn(2, 6, m.in_features, dtype=dtype)
        with lora.attached():
            y = m(xin)
        torch.testing.assert_close(mm(xin), y, rtol=rtol, atol=rtol * y.abs().max().item())


def test_merge_lora_into_formula():
    w = torch.randn(6, 4, 3, 3)
    up, down = torch.randn(6, 2, 1, 1), torch.randn(2, 4, 3, 3)
    expect = w + (0.5 / 2) * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    torch.testing.assert_close(merge_lora_into(w, up, down, 0.5), expect)
    torch.testing.assert_close(merge_lora_into(w, up, down, None, strength=2.0),
                               w + 2.0 * (up.flatten(1) @ down.flatten(1)).reshape(w.shape))
    assert merge_lora_into(w.half(), up, down, 1.0).dtype == torch.float16


def test_export_format():
    lora = LoraAdapters(make_base(), rank=4, alpha=2.0)
    sd = lora.export(dtype=torch.float16)
    assert len(sd) == 3 * len(lora.names)
    k = "diffusion_model.down"
    assert sd[f"{k}.lora_down.weight"].shape == (4, 8, 3, 3)
    assert sd[f"{k}.lora_up.weight"].shape == (8, 4, 1, 1)
    k = "diffusion_model.transformer_blocks.0.attn1.to_q"
    assert sd[f"{k}.lora_down.weight"].shape == (4, 8) and sd[f"{k}.lora_up.weight"].shape == (8, 4)
    assert sd[f"{k}.alpha"].shape == () and sd[f"{k}.alpha"].dtype == torch.float32
    assert sd[f"{k}.alpha"].item() == 2.0
    assert "diffusion_model.grouped.lora_up.weight" not in sd
    for key, t in sd.items():
        assert t.device.type == "cpu" and not t.requires_grad
        if not key.endswith(".alpha"):
            assert t.dtype == torch.float16
    # a snapshot, not a view of the live factors
    sd32 = lora.export()
    with torch.no_grad():
        lora.parameters()[0].add_(1.0)
    assert not torch.equal(sd32[f"diffusion_model.{lora.names[0]}.lora_down.weight"], lora.parameters()[0])
    assert LoraAdapters(make_base(), rank=4, key_prefix="").export().keys() >= {"head.alpha"}
    root = nn.Linear(4, 4).requires_grad_(False)  # root itself is the target: no stray dots
    assert LoraAdapters(root, rank=2, key_prefix="").export().keys() == {"lora_up.weight", "lora_down.weight",
                                                                          "alpha"}
    assert "diffusion_model.alpha" in LoraAdapters(root, rank=2).export()
    assert set(FullAdapters(root, key_prefix="").export()) == {"diff", "diff_b"}


def test_load_round_trip_and_alpha_adoption():
    base = make_base()
    x = inputs()
    a = LoraAdapters(base, rank=4, alpha=3.0, seed=1)
    with a.attached():
        train(a, x)
        randomize_up(a)
        ref = a(x)
    sd = a.export()
    b = LoraAdapters(base, rank=4, alpha=4.0, seed=2)  # other init, other alpha: the file's alpha wins
    b.load(sd)
    with b.attached():
        torch.testing.assert_close(b(x), ref, rtol=0, atol=0)
    c = LoraAdapters(base, rank=4, alpha=3.0, seed=5)
    c.load_state_tensors(a.state_tensors())
    with c.attached():
        assert torch.equal(c(x), ref)


def test_load_mismatch_errors():
    base = make_base()
    lora = LoraAdapters(base, rank=4)
    sd = lora.export()
    missing = dict(sd)
    del missing["diffusion_model.head.lora_up.weight"]
    with pytest.raises(ValueError, match="missing.*head.lora_up"):
        lora.load(missing)
    extra = dict(sd, **{"diffusion_model.nope.alpha": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="unexpected.*nope"):
        lora.load(extra)
    with pytest.raises(ValueError, match="shape"):
        lora.load(LoraAdapters(base, rank=2).export())
    with pytest.raises(ValueError, match="missing"):
        lora.load(LoraAdapters(base, rank=4, include=attention_only).export())
    with pytest.raises(ValueError, match="keys"):
        lora.load_state_tensors({})


def test_seeded_init_is_deterministic_and_per_module():
    base = make_base()
    a, b = LoraAdapters(base, rank=4, seed=0), LoraAdapters(base, rank=4, seed=0)
    c = LoraAdapters(base, rank=4, seed=1)
    sub = LoraAdapters(base, rank=4, seed=0, include=attention_only)
    sa, sb, sc, ss = (x.state_tensors() for x in (a, b, c, sub))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["head.lora_down.weight"], sc["head.lora_down.weight"])
    assert all(torch.equal(ss[k], sa[k]) for k in ss)
    bound = 1 / 8 ** 0.5  # kaiming-uniform(a=√5) = U(±1/√fan_in)
    d = sa["transformer_blocks.0.attn1.to_q.lora_down.weight"]
    assert d.abs().max() <= bound and d.abs().max() > 0.5 * bound
    assert all(sa[k].abs().sum() == 0 for k in sa if k.endswith("lora_up.weight"))


def test_attention_only():
    lora = LoraAdapters(make_base(), rank=2, include=attention_only)
    assert sorted(lora.names) == sorted(["proj_in"] + LINEARS[:-1])


def test_detach_removes_hooks_and_is_idempotent():
    base = make_base()
    x = inputs()
    ref = base(x)
    counts = {n: len(m._forward_hooks) for n, m in base.named_modules()}
    lora = LoraAdapters(base, rank=4)
    randomize_up(lora)
    lora.attach()
    lora.attach()
    assert sum(len(m._forward_hooks) for m in base.modules()) == len(lora.names)
    assert not torch.allclose(base(x), ref)
    lora.detach()
    lora.detach()
    assert {n: len(m._forward_hooks) for n, m in base.named_modules()} == counts
    assert torch.equal(base(x), ref)
    with pytest.raises(RuntimeError, match="not attached"):
        lora(x)
    with lora:
        assert lora.is_attached
    assert not lora.is_attached
    lora.attach()
    with lora.attached():  # nested: stays attached afterwards
        pass
    assert lora.is_attached
    del lora
    gc.collect()  # a forgotten detach must not leave hooks on the shared module
    assert torch.equal(base(x), ref)


def test_checkpoint_outer_and_inner():
    x = inputs()
    grads = []
    for mode in ("plain", "outer", "inner"):
        base = make_base(inner_checkpoint=(mode == "inner"))
        lora = LoraAdapters(base, rank=4)
        randomize_up(lora)
        with lora.attached():
            out = checkpoint(lora, x, use_reentrant=False) if mode == "outer" else lora(x)
            out.square().mean().backward()
        grads.append([p.grad.clone() for p in lora.parameters()])
    for g in grads[1:]:
        for a, b in zip(grads[0], g):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_autocast_bf16():
    base = make_base()
    x = inputs()
    lora = LoraAdapters(base, rank=4)
    randomize_up(lora)
    with lora.attached():
        ref = lora(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = lora(x)
            out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)
    for p in lora.parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def test_low_precision_base_with_fp32_factors():
    base32 = make_base()
    base = make_base(dtype=torch.bfloat16)
    x = inputs()
    lora = LoraAdapters(base, rank=4)  # fp32 factors on a bf16 module: input cast, output cast back
    lora32 = LoraAdapters(base32, rank=4)
    randomize_up(lora)
    randomize_up(lora32)
    with lora.attached(), lora32.attached():
        out = lora(x.bfloat16())
        out.float().square().mean().backward()
        ref = lora32(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora.parameters())


def test_built_under_inference_mode_still_trains():
    base = make_base()
    x = inputs()
    with torch.inference_mode():  # nodes execute under inference_mode
        lora = LoraAdapters(base, rank=4)
        full = FullAdapters(base)
        lora.load(lora.export())
        full.load(full.export())
    for p in lora.parameters() + full.parameters():
        assert not p.is_inference() and p.requires_grad
    with lora.attached():
        train(lora, x, steps=1)
    train(full, x, steps=1)


def test_multihead_attention_out_proj_is_skipped():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, t):
            return self.mha(t, t, t, need_weights=False)[0]

    m = M()
    m.proj = nn.Linear(8, 8)
    with pytest.warns(UserWarning, match="requires_grad=True"):
        LoraAdapters(m, rank=2)
    m.requires_grad_(False)
    lora = LoraAdapters(m, rank=2)
    assert lora.names == ["proj"]
    assert lora.skipped == [("mha.out_proj", "MultiheadAttention.out_proj is never called")]
    with pytest.raises(ValueError, match="no nn.Linear"):
        LoraAdapters(m, rank=2, include=lambda n, mod: n.startswith("mha"))


# ------------------------------------------------------------------------------------------- full

def test_full_matches_merged_diffs_and_base_untouched():
    base = make_base()
    snap = snapshot(base)
    x = inputs()
    ref = base(x)
    full = FullAdapters(base)
    # not bit-equal: aten picks another (equally exact) matmul path for a 3-D input when the weight
    # requires grad; same values, other summation order
    torch.testing.assert_close(full(x), ref, rtol=1e-6, atol=1e-6)
    train(full, x, steps=5)
    out = full(x)
    assert not torch.allclose(out, ref)
    assert_untouched(base, snap)
    assert torch.equal(base(x), ref)
    sd = full.export()
    torch.testing.assert_close(merged_diff_model(base, sd)(x), out, rtol=1e-5, atol=1e-6)
    # every floating parameter is trained; GroupNorm and grouped conv included
    assert set(full.names) == {k for k, _ in base.named_parameters()}


def test_full_export_keys_and_patches():
    base = make_base()
    full = FullAdapters(base)
    train(full, inputs(), steps=2)
    sd = full.export(dtype=torch.float16)
    assert "diffusion_model.norm.diff" in sd and "diffusion_model.norm.diff_b" in sd
    assert "diffusion_model.transformer_blocks.0.attn1.to_q.diff" in sd
    assert "diffusion_model.head.diff_b" in sd
    assert len(sd) == len(full.names)
    assert all(t.dtype == torch.float16 and t.device.type == "cpu" for t in sd.values())
    patches = full.patches()
    assert set(patches) == {f"diffusion_model.{n}" for n in full.names}
    kind, (delta,) = patches["diffusion_model.head.weight"]
    assert kind == "diff" and delta.dtype == torch.float32
    torch.testing.assert_close(delta, full.parameters()[full.names.index("head.weight")].detach()
                               - base.head.weight)
    torch.testing.assert_close(full.export()["diffusion_model.head.diff"], delta, rtol=0, atol=0)


def test_full_include_load_and_errors():
    base = make_base()
    x = inputs()
    full = FullAdapters(base, include=attention_only)
    assert all(attention_only(n.rsplit(".", 1)[0], None) for n in full.names)
    assert "head.weight" not in full.names and "proj_in.weight" in full.names
    train(full, x, steps=3)
    ref = full(x)
    other = FullAdapters(base, include=attention_only)
    other.load(full.export())
    torch.testing.assert_close(other(x), ref, rtol=1e-6, atol=1e-7)
    again = FullAdapters(base, include=attention_only)
    again.load_state_tensors(full.state_tensors())
    assert torch.equal(again(x), ref)
    with pytest.raises(ValueError, match="missing"):
        FullAdapters(base).load(full.export())
    bad = full.export()
    bad["diffusion_model.proj_in.diff"] = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        other.load(bad)


def test_full_diff_is_relative_to_construction_snapshot():
    # The host may later swap/patch the shared tensors: Δ stays relative to the starting weights.
    base = make_base()
    full = FullAdapters(base)
    train(full, inputs(), steps=2)
    d0 = full.export()["diffusion_model.head.diff"]
    base.head.weight = nn.Parameter(base.head.weight + 1.0, requires_grad=False)
    torch.testing.assert_close(full.export()["diffusion_model.head.diff"], d0, rtol=0, atol=0)


def test_full_checkpoint_and_autocast_and_low_precision():
    x = inputs()
    base = make_base()
    full = FullAdapters(base)
    full(x).square().mean().backward()
    g_plain = [p.grad.clone() for p in full.parameters()]
    for p in full.parameters():
        p.grad = None
    checkpoint(full, x, use_reentrant=False).square().mean().backward()
    for a, p in zip(g_plain, full.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-6, atol=1e-7)
    for p in full.parameters():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = full(x)
        out.float().square().mean().backward()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), base(x), rtol=5e-2, atol=5e-2)
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in full.parameters())
    # bf16 base, fp32 masters: forward runs in bf16, grads land on the fp32 masters
    base16 = make_base(dtype=torch.bfloat16)
    full16 = FullAdapters(base16)
    out = full16(x.bfloat16())
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.dtype == torch.float32 and p.grad is not None for p in full16.parameters())
    assert all(p.grad is None for p in base16.parameters())


def test_full_adapters_installed_work_with_checkpointing_inside_root():
    """The node's full mode: trained copies installed in a private root, per-block checkpointing."""
    from d2f_core.training.checkpointing import checkpointed

    torch.manual_seed(0)
    root = nn.Sequential(nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 4)).requires_grad_(False)
    reference = copy.deepcopy(root)
    full = FullAdapters(root)
    x = torch.randn(5, 6)
    with full.installed(), checkpointed([root[0], root[2]]):
        full(x).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in zip(full.names, full.parameters())}
    ref = {n: p for n, p in reference.named_parameters()}
    for p in ref.values():
        p.requires_grad_(True)
    reference(x).pow(2).sum().backward()
    for n, g in grads.items():
        assert torch.allclose(g, ref[n].grad, atol=1e-6), n
    assert all(not p.requires_grad for p in root.parameters())  # originals back after exit


class _KernelChoosingBlock(torch.nn.Module):
    """Stands for a block whose attention kernel is picked from torch's global SDPA switches: with cuDNN
    attention allowed it saves a tensor of another shape for backward (as cuDNN's [B, H, L, 1] log-sum-exp
    against flash's [B, H, L])."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3))
        self.seen = []

    def forward(self, x):
        cudnn = torch.backends.cuda.cudnn_sdp_enabled()
        self.seen.append(cudnn)
        return (x.unsqueeze(-1) * self.w).sum(-1) if cudnn else x * self.w.sum()


def test_checkpointed_forward_and_recompute_pick_the_same_attention_kernels():
    from d2f_core.training.checkpointing import checkpointed
    x = torch.randn(2, 3, requires_grad=True)
    was = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        # The fault: the kernel choice changes between the forward and the recomputation. Plain checkpointing
        # hands the forward's backward the other kernel's tensors and rejects them.
        block = _KernelChoosingBlock()
        out = checkpoint(block, x, use_reentrant=False)
        torch.backends.cuda.enable_cudnn_sdp(False)
        with pytest.raises(torch.utils.checkpoint.CheckpointError):
            out.sum().backward()
        # checkpointed(): both passes run with cuDNN attention excluded, whatever the switches say outside.
        block = _KernelChoosingBlock()
        torch.backends.cuda.enable_cudnn_sdp(True)
        with checkpointed([block]):
            out = block(x)
            torch.backends.cuda.enable_cudnn_sdp(False)
            out.sum().backward()
            torch.backends.cuda.enable_cudnn_sdp(True)
            block(x).sum().backward()
        assert block.seen == [False, False, False, False]  # two forwards, two recomputations
        assert torch.backends.cuda.cudnn_sdp_enabled()  # restored outside the blocks
        torch.testing.assert_close(block.w.grad, 2 * x.detach().sum(0).sum() * torch.ones(3))
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)
