"""Segmentation models behind one BentoML service: class tables, rendering, pre/post-processing, architectures."""

from .registry import MODEL_NAMES

__all__ = ["MODEL_NAMES"]
