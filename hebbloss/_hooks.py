"""The one owner of the hooks hebbloss puts on a user's model, and the base of the handles that own them
(:func:`hebbloss.attach`'s ``Plasticity``, :func:`hebbloss.feedback.convert`'s ``Feedback``; the probe's
feature capture uses a :class:`HookOwner` directly).

Every hook goes on through PyTorch's ``register_forward_(pre_)hook`` and comes off through the
``RemovableHandle`` it returned; nothing else touches a module's hook dictionaries. A hook placed by
:meth:`HookOwner.forward_hook` acts on the model it was placed on only: a deep copy of that model
(``copy.deepcopy``, ``probe.baselines.random_copy``, an EMA copy) gets an inert stand-in, so a copy
never feeds the user's handle (nor carries a copy of it), and the original's handle is unaffected.
"""
from __future__ import annotations

from typing import Callable, List

from torch import nn
from torch.utils.hooks import RemovableHandle


def _inert(*args, **kwargs) -> None:
    """What a deep copy of a model gets in place of a hook a hebbloss handle owns: it does nothing."""
    return None


class _OwnedHook:
    """A hook function that a deep copy of its module replaces by :func:`_inert`."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo) -> Callable:
        return _inert


class HookOwner:
    """Holds hook handles; :meth:`remove` takes every one of them off, and may be called twice.
    Usable as a context manager (the hooks come off on exit, also on an exception)."""

    def __init__(self) -> None:
        self._handles: List[RemovableHandle] = []

    def add(self, handle: RemovableHandle) -> RemovableHandle:
        """Own a handle returned by any ``register_*_hook`` (e.g. an optimizer's step hook)."""
        self._handles.append(handle)
        return handle

    def forward_hook(self, module: nn.Module, fn: Callable, *, pre: bool = False, **kwargs) -> RemovableHandle:
        """Place ``fn`` as a forward hook (``pre=True``: forward pre-hook) of ``module`` and own it;
        ``kwargs`` go to ``register_forward_(pre_)hook`` (``with_kwargs``, ``always_call``, ``prepend``).
        A deep copy of ``module`` gets an inert stand-in instead of ``fn``."""
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        return self.add(register(_OwnedHook(fn), **kwargs))

    def remove(self) -> None:
        """Take every owned hook off (last placed first)."""
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> "HookOwner":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class HookHandle:
    """Base of the handles that change a user's model: hooks are placed through ``self._hooks`` (a
    :class:`HookOwner`); :meth:`remove` takes them off (a subclass extends it to undo what else it
    added) and may be called twice; ``with handle:`` removes on exit, also on an exception.

    Cooperative, so that an ``nn.Module`` handle lists it first: ``class Plasticity(HookHandle, nn.Module)``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._hooks = HookOwner()

    def remove(self) -> None:
        """Take every hook off: the model is exactly as before the handle was made."""
        self._hooks.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
