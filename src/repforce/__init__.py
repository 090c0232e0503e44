"""repforce: Representation Forcing unified multimodal models (Wang et al. 2026), open implementation.

    import repforce
    model = repforce.load("runs/pixel_rf")
    images = model.generate(["a red circle left of a blue square"], n=4)
"""

__version__ = "0.1.0"


def load(path, device: str = "cpu", ema: bool = True):
    """A ready-to-sample model (an `Engine`) from a run folder or a checkpoint folder."""
    from .engine import load as _load

    return _load(path, device=device, ema=ema)
