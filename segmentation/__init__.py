"""Segmentation models behind one BentoML service: class tables, rendering, pre/post-processing, architectures."""

MODEL_NAMES = ("dilatednet", "mask2former", "unet")
