"""The toy world: a world small enough to train and measure the look-back method on 2 CPU cores.

A coloured square or circle moves 2 px a frame in the direction its caption names, over a
gradient background (:mod:`toyworld.world`); its metrics read the object and the background back
from generated pixels (:mod:`toyworld.metrics`); :mod:`toyworld.evaluate` generates from held-out
start images and measures. :mod:`toyworld.base_model` trains the tiny SD1.5-architecture base,
:mod:`toyworld.build` runs it and the product's trainer (``training/train.py``) into the shipped
model (:mod:`toyworld.model`), and :mod:`toyworld.ablate` measures the paper's ablations.

It uses the model library (:mod:`lookback_core`) and the trainer; neither uses it.
"""
