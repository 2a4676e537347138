"""CompiledNet: torch.compile of the training network, with a trial per shape and an eager way out."""

import pytest
import torch

from d2f_core.training.adapters import LoraAdapters
from d2f_core.training.compilation import CompiledNet
from d2f_core.training.trainer import TrainConfig, Trainer

from test_training import BRIDGE, TinyNet, dataset


def lora_setup(seed=0):
    net = TinyNet(seed=seed).requires_grad_(False)
    adapters = LoraAdapters(net, rank=4, alpha=4.0, include=None, key_prefix="", seed=seed)
    # A non-zero `up` so that the LoRA path carries gradient to both factors from the first step.
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(0.01)
    return net, adapters


def train(wrap, steps=6):
    net, adapters = lora_setup()
    params = adapters.parameters()
    call = wrap(net, params)
    config = TrainConfig(steps=steps, batch_size=3, learning_rate=3e-3, seed=4, sync_every=2)
    with adapters.attached():
        result = Trainer(call, BRIDGE, params, dataset(), config).run()
    return result, call, adapters


def eager(net, params):
    return net


def test_compiled_training_follows_eager_training():
    torch._dynamo.reset()
    base, _, base_adapters = train(eager)
    result, compiled, adapters = train(lambda net, params: CompiledNet(net, params, backend="inductor"))
    assert compiled.fallback_reason is None and len(compiled.tried) == 1
    assert result.losses == pytest.approx(base.losses, rel=1e-4)
    for (k, a), b in zip(base_adapters.state_tensors().items(), adapters.state_tensors().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=k)
    # and it trained: the weights moved well beyond the agreement asked of the two runs (a per-step loss is no
    # evidence: it swings with the drawn flow time far more than six steps change it)
    moved = max(float((b - a).abs().max()) for a, b in zip(lora_setup()[1].state_tensors().values(),
                                                            adapters.state_tensors().values()))
    assert moved > 1e-3


def _failing_backward_backend():
    from torch._dynamo.backends.common import aot_autograd

    def fails(gm, example_inputs):
        raise RuntimeError("backward compiler broke")
    return aot_autograd(fw_compiler=lambda gm, example_inputs: gm, bw_compiler=fails)


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_compiler_failure_trains_eagerly_from_the_first_step(where):
    torch._dynamo.reset()

    def broken_forward(gm, example_inputs):
        raise RuntimeError("forward compiler broke")
    backend = broken_forward if where == "forward" else _failing_backward_backend()
    base, _, base_adapters = train(eager)
    result, compiled, adapters = train(lambda net, params: CompiledNet(net, params, backend=backend))
    assert f"{where} compiler broke" in compiled.fallback_reason
    assert result.losses == base.losses  # the failed trial cost no step and changed nothing
    for a, b in zip(base_adapters.state_tensors().values(), adapters.state_tensors().values()):
        assert torch.equal(a, b)


class StopRequest(Exception):
    pass


def test_stop_requests_and_out_of_memory_pass_through():
    torch._dynamo.reset()
    for error in (StopRequest("stop"), torch.OutOfMemoryError("CUDA out of memory")):
        def net(x, t, context, error=error):
            raise error
        compiled = CompiledNet(net, [], backend="eager", passthrough=(StopRequest,))
        with pytest.raises(type(error)):
            compiled(torch.zeros(1, 4, 8, 8), torch.zeros(1), context=torch.zeros(1, 5, 8))
        assert compiled.fallback_reason is None


def test_calls_without_gradients_never_compile():
    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    net, adapters = lora_setup()
    compiled = CompiledNet(net, adapters.parameters(), backend=counting)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.randn(2, 5, 8)
    with adapters.attached():
        with torch.no_grad():
            eager_out = compiled(x, t, context=ctx)
        assert not graphs and not compiled.tried
        out = compiled(x, t, context=ctx)  # with gradients: tried, then compiled
        assert graphs and len(compiled.tried) == 1
        torch.testing.assert_close(out, eager_out)
        compiled(x[:1], t[:1], context=ctx[:1])  # a new shape (bucket) gets its own trial
        assert len(compiled.tried) == 2
