"""Small corrections to openleadr's message templates, applied once per process.

openleadr renders every message from Jinja templates. Where one cannot say what 2.0b needs, a
patched copy of that template is put in front of its loader (the others stay openleadr's own, so
rendering and signing work as before). Each patch replaces one exact piece of openleadr 0.5.36's
template text, and fails loudly if that text has changed.

* ``oadrCreatePartyRegistration``: ``oadrTransportAddress`` only when there is one (a pull VEN
  has none; openleadr would send ``None`` as the address).
"""

from __future__ import annotations

from typing import Final

from jinja2 import ChoiceLoader, DictLoader
from openleadr import messaging  # type: ignore[import-untyped]

__all__ = ["install"]

_ADDRESS: Final = (
    "    <oadr:oadrTransportAddress>{{ transport_address }}</oadr:oadrTransportAddress>\n"
)
_PATCHES: Final[dict[str, tuple[str, str]]] = {
    "oadrCreatePartyRegistration.xml": (
        _ADDRESS,
        "    {% if transport_address %}\n" + _ADDRESS + "    {% endif %}\n",
    ),
}
_patched: dict[str, str] = {}


def install(extra: dict[str, tuple[str, str]] | None = None) -> None:
    """Apply the patches above and ``extra`` (template name → (openleadr's text, ours))."""
    env = messaging.TEMPLATES
    wanted = {**_PATCHES, **(extra or {})}
    new = {name: patch for name, patch in wanted.items() if name not in _patched}
    if not new:
        return
    base = env.loader.loaders[-1] if isinstance(env.loader, ChoiceLoader) else env.loader
    for name, (theirs, ours) in new.items():
        source = base.get_source(env, name)[0]
        if theirs not in source:
            raise RuntimeError(f"openleadr's {name} changed: pin openleadr 0.5.36")
        _patched[name] = source.replace(theirs, ours)
    env.loader = ChoiceLoader([DictLoader(dict(_patched)), base])
    env.cache = None if env.cache is None else type(env.cache)(env.cache.capacity)
