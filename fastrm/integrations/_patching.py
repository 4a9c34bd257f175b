"""What the adapters share: a report of what was patched (with the undo), and attribute replacement."""

from __future__ import annotations

import inspect
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger("fastrm")


@dataclass
class PatchReport:
    """What an adapter's ``patch()`` / ``register()`` did to ``library``: ``patched`` / ``not_patched`` map a site
    to what runs there now / why not; ``calls`` and ``fallbacks`` count, per site, the calls fastrm served and
    those handed back to the library (the first reason in ``fallback_reasons``). ``undo()`` (or leaving the
    ``with`` block) restores the library."""

    library: str
    version: str
    tested: str
    backend: str | None
    patched: dict = field(default_factory=dict)
    not_patched: dict = field(default_factory=dict)
    calls: Counter = field(default_factory=Counter)
    fallbacks: Counter = field(default_factory=Counter)
    fallback_reasons: dict = field(default_factory=dict)
    originals: dict = field(default_factory=dict)  # site -> the library's own function, for fallbacks
    active: bool = True
    _undo: list = field(default_factory=list, repr=False)

    def __enter__(self) -> PatchReport:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def replace(self, owner, name: str, new) -> None:
        """``setattr(owner, name, new)`` (an attribute or a dict entry), remembered for the undo."""
        if isinstance(owner, dict):
            self._undo.append((owner, name, owner.get(name, _MISSING)))
            owner[name] = new
        else:
            self._undo.append((owner, name, getattr(owner, name, _MISSING)))
            setattr(owner, name, new)

    def replace_bindings(self, prefix: str, name: str, original, new) -> list[str]:
        """Replace ``name`` in every loaded module of the library (``prefix`` and ``prefix.*``) that binds it to
        ``original``; return those modules' names."""
        where = []
        for module_name, module in list(sys.modules.items()):
            if (module_name == prefix or module_name.startswith(prefix + ".")) and module is not None \
                    and module.__dict__.get(name) is original:
                self.replace(module, name, new)
                where.append(module_name)
        return where

    def undo(self) -> None:
        """Put every replaced attribute back (idempotent)."""
        for owner, name, original in reversed(self._undo):
            if isinstance(owner, dict):
                if original is _MISSING:
                    owner.pop(name, None)
                else:
                    owner[name] = original
            elif original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        if self._undo:
            log.info("fastrm.integrations: %s restored", self.library)
        self._undo.clear()
        self.active = False

    def fallback(self, site: str, reason: str) -> None:
        self.fallbacks[site] += 1
        if site not in self.fallback_reasons:
            log.warning("fastrm.integrations: %s %s handed back to %s: %s", self.library, site, self.library, reason)
            self.fallback_reasons[site] = reason

    def log(self) -> None:
        for line in str(self).splitlines():
            log.info(line)

    def __str__(self) -> str:
        lines = [f"fastrm on {self.library} {self.version} (tested: {self.tested}); backend="
                 f"{self.backend or 'auto'}; {'active' if self.active else 'undone'}"]
        for site, what in self.patched.items():
            lines.append(f"  patched   {site}: {what} [fastrm calls {self.calls[site]}, "
                         f"fallbacks {self.fallbacks[site]}]")
        for site, why in self.not_patched.items():
            lines.append(f"  unpatched {site}: {why}")
        return "\n".join(lines)


_MISSING = object()


def bind(signature: inspect.Signature, args, kwargs):
    """The call's arguments by name (defaults applied), or None when they do not fit the signature."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return bound.arguments
