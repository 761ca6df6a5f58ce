"""Batch Manhattan: update each parameter by the sign of its batch gradient (Amit 2019, after
Zamanidoost et al. 2015), on top of any torch optimizer (SGD gives w -= lr * sign(g)).
"""
from __future__ import annotations

from collections import OrderedDict

import torch


class BatchManhattan(torch.optim.Optimizer):
    """Wraps ``optimizer``: ``step()`` replaces every gradient by its sign, then runs the inner step.

    It is a torch Optimizer (LR schedulers, ``zero_grad``, ``state_dict`` work) sharing the inner
    optimizer's ``param_groups`` and ``state``. With a closure, the gradients the closure computes
    are signed before the inner update.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"BatchManhattan wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        # Deliberately no super().__init__(): the parameters and their state stay the inner optimizer's.
        self.optimizer = optimizer
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @torch.no_grad()
    def sign_gradients(self) -> None:
        """Replace each parameter's gradient by its sign (in place)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.sign_()

    def step(self, closure=None):
        """Sign the gradients, then take the inner optimizer's step."""
        for hook in list(self._optimizer_step_pre_hooks.values()):
            hook(self, (), {})
        if closure is None:
            self.sign_gradients()
            result = self.optimizer.step()
        else:
            def signed():
                with torch.enable_grad():
                    loss = closure()
                self.sign_gradients()
                return loss
            result = self.optimizer.step(signed)
        for hook in list(self._optimizer_step_post_hooks.values()):
            hook(self, (), {})
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group) -> None:
        self.optimizer.add_param_group(param_group)

    def __getstate__(self):
        return {"optimizer": self.optimizer}

    def __setstate__(self, state):
        self.__init__(state["optimizer"])

    def __repr__(self) -> str:
        return f"BatchManhattan({self.optimizer!r})"
