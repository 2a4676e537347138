"""CUDA-graph replay of a network's training forward and backward.

At small batch a UNet step is bound by the host launching ~10⁴ kernels one by one, not by the GPU.
``GraphedNet`` captures forward and backward once per input shape (``torch.cuda.make_graphed_callables``)
and then replays each as a single launch. Gradients reach the trainable tensors exactly as in eager
mode. Anything that cannot be captured (a host sync inside the network, CPU work) makes it fall back to
the eager network, once, with the reason kept in ``fallback_reason``.
"""

from __future__ import annotations

import logging

import torch


def input_key(x, t, cond) -> tuple:
    """What a captured graph or a static-shape compilation is specialised on: shapes and dtypes of the
    network's inputs (one entry per resolution bucket and batch size)."""
    return (tuple(x.shape), x.dtype, tuple(t.shape)) + tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(cond.items()))


def release_failed_capture(device) -> None:
    """Leave the CUDA state as it was before a capture that failed part-way.

    A capture registers the device's default generator for graph-safe random offsets and releases it when
    the capture ends. A capture that raised may never have ended: the generator then refuses every later
    draw in the process ("Offset increment outside graph capture"), breaking other nodes' sampling. Beginning
    and ending one empty capture on a side stream releases it again.
    """
    with torch.cuda.device(device):
        try:
            torch.cuda.synchronize()
        except Exception:  # the sticky error of the failed capture is reported (and cleared) by this call
            pass
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                pass
        except Exception as exc:
            logging.error(f"could not end a failed CUDA-graph capture cleanly: {type(exc).__name__}: {exc}")
        finally:
            del graph
        try:
            torch.randn(1, device=device)
            torch.cuda.synchronize()
        except Exception as exc:
            logging.error(f"the default CUDA generator is unusable after a failed CUDA-graph capture: {exc}. "
                          "Restart ComfyUI before sampling, and train with cuda_graphs off.")


class _Positional(torch.nn.Module):
    """The network as a module of positional tensors, owning the trainable tensors so that the
    graphed backward returns their gradients."""

    def __init__(self, net, keys: tuple[str, ...], params: list[torch.nn.Parameter]):
        super().__init__()
        self.net, self.keys = net, keys
        self.trainable = torch.nn.ParameterList(params)

    def forward(self, x, t, *conds):
        return self.net(x, t, **dict(zip(self.keys, conds)))


class GraphedNet:
    """``eager_first``: calls per new input shape that run eagerly (real training steps) before the shape is
    captured, so that one-time initialisations a first step does on the training stream (library handles,
    workspaces, lazily loaded kernels) never happen inside a capture."""

    def __init__(self, net, params: list[torch.nn.Parameter], max_graphs: int = 4, warmup: int = 3,
                 eager_first: int = 1):
        self.net, self.params = net, list(params)
        self.max_graphs, self.warmup, self.eager_first = max_graphs, warmup, eager_first
        self.graphs: dict = {}
        self.eager_calls: dict = {}
        self.fallback_reason: str | None = None

    def __call__(self, x, t, **cond):
        if self.fallback_reason is not None or not x.is_cuda or not torch.is_grad_enabled():
            return self.net(x, t, **cond)
        key = input_key(x, t, cond)
        graphed = self.graphs.get(key)
        if graphed is None:
            if self.eager_calls.get(key, 0) < self.eager_first:
                self.eager_calls[key] = self.eager_calls.get(key, 0) + 1
                return self.net(x, t, **cond)
            if len(self.graphs) >= self.max_graphs:
                return self.net(x, t, **cond)  # too many shapes (buckets): the rest run eagerly
            keys = tuple(sorted(cond))
            module = _Positional(self.net, keys, self.params)
            # The capture keeps its sample inputs as the static buffers that every replay copies into: give it
            # copies, so that no caller's tensor (a cached label, a data tensor) is ever written by a replay.
            args = tuple(a.detach().clone() for a in (x, t) + tuple(cond[k] for k in keys))
            try:
                graphed = torch.cuda.make_graphed_callables(module, args, num_warmup_iters=self.warmup,
                                                            allow_unused_input=True)
            except Exception as exc:  # capture is an optimisation: never let it end a run
                self.fallback_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                logging.warning(f"CUDA graphs off, training eagerly: {self.fallback_reason}")
                release_failed_capture(x.device)
                return self.net(x, t, **cond)
            self.graphs[key] = graphed
        return graphed(x, t, *(cond[k] for k in sorted(cond)))
