"""repforce: Representation Forcing unified multimodal models (Wang et al. 2026), open implementation."""

__version__ = "0.1.0"
