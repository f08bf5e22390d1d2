"""One undo mechanism: every write a patch makes goes through a Recorder, which keeps
(object, name, old value) and replays them backwards on undo, so unpatch is exact by construction."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

_ABSENT = object()


class Recorder:
    def __init__(self) -> None:
        self._log: list[tuple[str, Any, Any, Any]] = []

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        """Set obj.name (attribute, buffer or parameter), remembering what was there."""
        old = obj.__dict__.get(name, _ABSENT) if name not in getattr(obj, "_buffers", {}) else obj._buffers[name]
        self._log.append(("attr", obj, name, old))
        setattr(obj, name, value)

    def on_undo(self, restore: Callable[[], None]) -> None:
        """Run ``restore()`` when undo reaches this point (for writes that are not one attribute,
        e.g. a reference-counted module-level swap shared by several patched models)."""
        self._log.append(("call", restore, None, None))

    def undo(self) -> None:
        """Restore every recorded write, newest first."""
        while self._log:
            kind, obj, name, old = self._log.pop()
            if kind == "call":
                obj()
            elif old is _ABSENT:
                delattr(obj, name)
            elif name in getattr(obj, "_buffers", {}):
                obj._buffers[name] = old
            else:
                setattr(obj, name, old)

    def __len__(self) -> int:
        return len(self._log)
