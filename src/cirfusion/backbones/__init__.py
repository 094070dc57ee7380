"""Backbones: one protocol (``Backbone``), created by name with :func:`create_backbone`."""

from .base import Backbone, ImageFeatures, TextFeatures

__all__ = ["Backbone", "ImageFeatures", "TextFeatures"]
