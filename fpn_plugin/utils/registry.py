"""Registration that survives importing the plugin twice."""
from typing import Callable, Optional

from detectron2.utils.registry import Registry

__all__ = ["register"]


def _qualified_name(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def register(registry: Registry, name: Optional[str] = None) -> Callable:
    """
    Like ``@registry.register()``, but re-registering the same object is allowed.

    Detectron2 refuses a second registration of a name. Importing the plugin a second time
    (``importlib.reload``, a test that clears ``sys.modules``, or the package reached through
    two paths) re-runs the decorators with new class objects of the same qualified name;
    those replace the old entry. A *different* object under a taken name is still an error,
    so the plugin never silently shadows someone else's component.
    """

    def deco(obj):
        key = name or obj.__name__
        existing = registry._obj_map.get(key)  # fvcore's Registry has no public "replace"
        if existing is None:
            registry._do_register(key, obj)
        elif _qualified_name(existing) == _qualified_name(obj):
            registry._obj_map[key] = obj
        else:
            raise KeyError(
                f"{registry._name} already has {key!r} from {_qualified_name(existing)}; "
                f"fpn_plugin cannot register {_qualified_name(obj)} under the same name"
            )
        return obj

    return deco
