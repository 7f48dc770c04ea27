"""Name registries for the plug-in points (principals, candidate generators, learners,
methods, CAGE objectives).

A plug-in is registered once, next to its implementation::

    PRINCIPALS = Registry("principal")

    @PRINCIPALS.register("oracle")
    def make_oracle(section, context): ...

and configs select it by name (``type: oracle``). An unknown name raises
:class:`UnknownNameError`, a :class:`~align_jax.config.FieldError` whose field is the
config key, so a config loader reports it as ``file:line: key: unknown principal
'x'; known: ...``. Registering a name twice is an error (two modules fighting over
one name is a bug, not an override).
"""

from __future__ import annotations

from typing import Generic, Iterator, Optional, TypeVar

from align_jax.config import FieldError

__all__ = ["Registry", "UnknownNameError"]

T = TypeVar("T")


class UnknownNameError(FieldError):
    """A name that no plug-in registered; ``field`` is the config key that named it."""


class Registry(Generic[T]):
    """An ordered ``name -> plug-in`` table for one kind of plug-in.

    Args:
      kind: what the entries are (``"principal"``, ``"learner"``, ...), used in errors.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: Optional[T] = None):
        """Registers ``entry`` under ``name``; without ``entry``, returns a decorator.

        Raises:
          ValueError: ``name`` is empty or already registered.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")

        def add(value: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = value
            return value

        if entry is None:
            return add
        return add(entry)

    def get(self, name: str, field: str = "type") -> T:
        """The entry registered as ``name``.

        Raises:
          UnknownNameError: no such name (the message lists the known ones); its
            ``field`` is ``field``, the config key that held the name.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(field, f"unknown {self.kind} {name!r}; known: {', '.join(self._entries)}") from None

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self):
        """``(name, entry)`` pairs in registration order."""
        return self._entries.items()

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


def check_name(registry: Registry, name: str, field: str = "type") -> None:
    """Raises :class:`UnknownNameError` unless ``name`` is registered (for ``__post_init__``)."""
    registry.get(name, field)


__all__ += ["check_name"]
