"""Whole text-to-image systems as jaxt2i cascades: reading and writing other projects' layouts.

`deepfloyd_if`: diffusers DeepFloyd IF pipeline directories <-> jaxt2i cascade directories
(`python -m jaxt2i.convert`). `unclip`: the unCLIP pipeline (prior -> decoder -> SR stages)
that `python -m jaxt2i.sample` runs from a cascade directory whose cascade.json says
"kind": "unclip". A module per system; cascade.json names its `kind`.
"""
