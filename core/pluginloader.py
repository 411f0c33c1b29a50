"""Plugin loading: built-ins and third-party packages through one path, with isolation.

Built-in plugins are declared as entry points of this distribution (group ``spl``), the same
way a third-party package declares its own. A plugin that fails to import or whose hook
raises is reported in one line on stderr and skipped; spl keeps working.

``SPL_LOAD_PLUGINS=a,b`` restricts the *third-party* plugins that load (empty: none);
built-ins always load, since spl's own commands live in them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass, field

import pluggy

from superlinear import hookspecs

ENTRY_POINT_GROUP = "spl"
BUILTIN_PREFIX = "superlinear.plugins."
# Used only when spl runs from a source tree without installed metadata (e.g. PYTHONPATH on a GPU box).
BUILTIN_MODULES = (
    "superlinear.plugins.meta",
    "superlinear.plugins.admin",
    "superlinear.plugins.models",
    "superlinear.plugins.bench",
    "superlinear.plugins.serve",
    "superlinear.plugins.server",
    "superlinear.plugins.chat",
    "superlinear.plugins.rag",
    "superlinear.plugins.lightrag",
)


@dataclass
class PluginInfo:
    name: str
    module: str
    version: str
    builtin: bool
    hooks: list[str] = field(default_factory=list)


@dataclass
class PluginState:
    manager: pluggy.PluginManager
    infos: dict[str, PluginInfo] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # plugin name -> one-line reason


_state: PluginState | None = None


def warn_broken(name: str, exc: BaseException) -> str:
    line = f"spl: warning: plugin {name!r} skipped: {type(exc).__name__}: {exc}".splitlines()[0]
    print(line, file=sys.stderr)
    return line


def _allowed_third_party() -> set[str] | None:
    raw = os.environ.get("SPL_LOAD_PLUGINS")
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _entry_points() -> list[tuple[str, str, str]]:
    """(name, module path, distribution version) for every entry point in group ``spl``."""
    found = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        version = ep.dist.version if ep.dist is not None else "?"
        found.append((ep.name, ep.value, version))
    if not any(value.startswith(BUILTIN_PREFIX) for _, value, _ in found):
        from superlinear.version import __version__

        found += [(m.rsplit(".", 1)[1], m, __version__) for m in BUILTIN_MODULES]
    return found


def load_plugins() -> PluginState:
    """Load (once) every allowed plugin and return the manager with what was loaded."""
    global _state
    if _state is not None:
        return _state
    manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
    manager.add_hookspecs(hookspecs)
    state = PluginState(manager)
    allowed = _allowed_third_party()
    for name, target, version in _entry_points():
        builtin = target.startswith(BUILTIN_PREFIX)
        if not builtin and allowed is not None and name not in allowed:
            continue
        if name in state.infos:
            continue
        try:
            module = importlib.import_module(target.split(":")[0])
            manager.register(module, name=name)
        except Exception as exc:  # a broken plugin must never take spl down
            state.broken[name] = warn_broken(name, exc)
            continue
        hooks = sorted(impl.name for impl in manager.get_hookcallers(module) or [])
        state.infos[name] = PluginInfo(name, module.__name__, version, builtin, hooks)
    _state = state
    return state


def collect(hook_name: str) -> list[tuple[str, tuple, dict]]:
    """Call ``hook_name`` on every plugin, isolating each one.

    Returns the ``register(...)`` calls as ``(plugin name, args, kwargs)``. A plugin whose hook
    raises is reported once on stderr and contributes nothing to this hook.
    """
    state = load_plugins()
    caller = getattr(state.manager.hook, hook_name)
    registered: list[tuple[str, tuple, dict]] = []
    for impl in caller.get_hookimpls():
        plugin_name = state.manager.get_name(impl.plugin) or "?"
        calls: list[tuple[str, tuple, dict]] = []

        def register(*args, _calls=calls, _name=plugin_name, **kwargs):
            _calls.append((_name, args, kwargs))

        try:
            impl.function(register=register)
        except Exception as exc:
            key = f"{plugin_name}.{hook_name}"
            if key not in state.broken:
                state.broken[key] = warn_broken(plugin_name, exc)
            continue
        registered.extend(calls)
    return registered


def model_loaders() -> list:
    """The model loaders plugins register (``register_model_loaders``), in load order; give them
    to ``superlinear.model.load_model(..., loaders=...)``."""
    return [args[0] for _plugin, args, _kwargs in collect("register_model_loaders") if args]


def reset_for_tests() -> None:
    global _state
    _state = None
