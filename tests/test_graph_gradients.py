"""Gradient accumulation with a backward that hands out the same storage at every call.

A CUDA-graph replay (``torch.cuda.make_graphed_callables``) returns the gradients of the trainable tensors in
static buffers that the next replay overwrites. Were a parameter's ``.grad`` None when such a gradient
arrives, autograd would adopt that storage as ``.grad``, and the next micro-batch's replay would overwrite the
gradient accumulated so far (two micro-batches: 2·g₂ instead of g₁ + g₂). This runs on the CPU with a stand-in
that has exactly that property, so the Trainer's accumulation is checked without a GPU; bench/check_graphs.py
checks the real graphs on the GPU machine.
"""

import torch

from d2f_core.training.trainer import TrainConfig, Trainer

from test_training import BRIDGE, TinyNet, dataset


class StaticGradients(torch.autograd.Function):
    """y = f(x) with its parameters' gradients written into one static buffer per parameter (as a graph replay)."""

    @staticmethod
    def forward(ctx, net, buffers, x, t, context, *params):
        ctx.net, ctx.buffers = net, buffers
        ctx.save_for_backward(x, t, context)
        with torch.no_grad():
            return net(x, t, context)

    @staticmethod
    def backward(ctx, grad_out):
        x, t, context = ctx.saved_tensors
        params = list(ctx.net.parameters())
        with torch.enable_grad():
            out = ctx.net(x, t, context)
            grads = torch.autograd.grad(out, params, grad_out)
        for buf, g in zip(ctx.buffers, grads):
            buf.copy_(g)  # the same storage at every call, handed out detached
        return (None, None, None, None, None) + tuple(b.detach() for b in ctx.buffers)


def train(net, static: bool, accumulation: int):
    params = list(net.parameters())
    buffers = [torch.zeros_like(p) for p in params]

    def graphed(x, t, context):
        return StaticGradients.apply(net, buffers, x, t, context, *params)
    config = TrainConfig(steps=4, batch_size=2, grad_accumulation=accumulation, learning_rate=1e-2, seed=7,
                         optimizer="sgd")
    Trainer(graphed if static else net, BRIDGE, params, dataset(), config).run()
    return [p.detach().clone() for p in params]


def test_accumulation_with_static_gradient_buffers_equals_eager():
    for accumulation in (1, 2, 4):
        eager = train(TinyNet(seed=1), static=False, accumulation=accumulation)
        static = train(TinyNet(seed=1), static=True, accumulation=accumulation)
        change = max(float((e - p0.detach()).abs().max()) for e, p0 in zip(eager, TinyNet(seed=1).parameters()))
        diff = max(float((e - s).abs().max()) for e, s in zip(eager, static))
        assert change > 1e-3, "training did not move the weights: the comparison would prove nothing"
        assert diff <= 1e-6 * change, f"accumulation {accumulation}: static-buffer gradients off by {diff / change:.2e}"
