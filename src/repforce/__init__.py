"""repforce: Representation Forcing unified multimodal models (Wang et al. 2026), open implementation.

    import repforce
    model = repforce.load("runs/pixel_rf")
    images = model.generate(["a red circle left of a blue square"], n=4)

The inference API (`load`, `Engine`, `GenOptions`, from engine.py) is attached on first use
(PEP 562), so `import repforce.worlds.shapeseval` and the other light modules do not load the
model stack.
"""

import importlib

__version__ = "0.1.0"
_ENGINE = ("load", "Engine", "GenOptions")


def __getattr__(name: str):
    if name in _ENGINE:
        return getattr(importlib.import_module(".engine", __name__), name)
    raise AttributeError(f"module 'repforce' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_ENGINE))
