"""maskformers: Mask2Former and OneFormer in plain PyTorch."""

__version__ = "0.1.0"

__all__ = ["__version__"]
