"""The one owner of the hook handles hebbloss puts on a user's model: always removable."""
from __future__ import annotations

from typing import List

from torch.utils.hooks import RemovableHandle


class HookOwner:
    """Holds hook handles; :meth:`remove` takes every one of them off, and may be called twice."""

    def __init__(self) -> None:
        self._handles: List[RemovableHandle] = []

    def add(self, handle: RemovableHandle) -> RemovableHandle:
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)
