"""``torch.compile`` of a network's training forward and backward, with a safe way out.

At batch ≥ 8 an SD UNet step is bound by the GPU, not by kernel launches, and what is left to win is
in the kernels themselves: the compiler fuses the elementwise tails (norms, activations, residual adds,
the LoRA bypass's cast-scale-add) into fewer kernels that read and write activations fewer times.
``CompiledNet`` compiles once per input shape (``dynamic=False``: bucketed resolutions are few
and static shapes give the best kernels) and tries each new shape once with a forward *and* a backward
(AOTAutograd may compile the backward lazily) before training uses it, so a compiler failure at either
end never costs a training step: it logs the reason and trains eagerly from then on.

It composes with :class:`~d2f_core.training.graphs.GraphedNet` (``GraphedNet(CompiledNet(net, params), params)``):
the compiled kernels are then captured and replayed as one launch, which also removes the guard checks
the compiled function runs on the host at every call.
"""

from __future__ import annotations

import logging

import torch

from .graphs import input_key


class CompiledNet:
    """``net(x, t, **cond)`` compiled with ``torch.compile(backend=backend, mode=mode)``.

    Calls without gradients (previews, scheduled-sampling rollouts) run the eager network: they are rare
    and would each cost a second compilation. ``passthrough``: exception types that are not compiler
    failures and must reach the caller (a host's stop request raised from inside the network);
    out-of-memory always does.
    """

    def __init__(self, net, params: list[torch.nn.Parameter], backend: str = "inductor", mode: str | None = None,
                 passthrough: tuple[type[BaseException], ...] = ()):
        self.net, self.params = net, list(params)
        self.compiled = torch.compile(net, backend=backend, mode=mode, dynamic=False)
        self.passthrough = (torch.OutOfMemoryError,) + tuple(passthrough)
        self.tried: set = set()
        self.fallback_reason: str | None = None

    def _trial(self, x, t, cond) -> None:
        """One forward and backward on detached copies: compiles both directions; gradients are discarded."""
        out = self.compiled(x.detach().clone(), t.detach().clone(), **{k: v.detach().clone() for k, v in cond.items()})
        wanted = [p for p in self.params if p.requires_grad]
        if out.requires_grad and wanted:
            torch.autograd.grad(out.float().square().mean(), wanted, allow_unused=True)

    def __call__(self, x, t, **cond):
        if self.fallback_reason is not None or not torch.is_grad_enabled():
            return self.net(x, t, **cond)
        key = input_key(x, t, cond)
        if key not in self.tried:
            try:
                self._trial(x, t, cond)
            except self.passthrough:
                raise
            except Exception as exc:  # compiling is an optimisation: never let it end a run
                self.fallback_reason = f"{type(exc).__name__}: {str(exc)[:500]}"
                logging.warning(f"torch.compile off, training eagerly: {self.fallback_reason}")
                return self.net(x, t, **cond)
            self.tried.add(key)
        return self.compiled(x, t, **cond)
