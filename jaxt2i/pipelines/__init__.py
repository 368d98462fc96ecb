"""Whole text-to-image systems as jaxt2i cascades: reading and writing other projects' layouts.

`deepfloyd_if`: diffusers DeepFloyd IF pipeline directories <-> jaxt2i cascade directories
(`python -m jaxt2i.convert`). A module per system; cascade.json names its `kind`.
"""
