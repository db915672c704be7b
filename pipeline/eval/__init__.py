"""Scoring what the method produces against ground truth, and looking at it.

``metrics`` defines the paper's metrics (Sec. 4.1) per sentence; ``scoring`` brings a split's maps to
image size and scores them; ``clip_checks`` tests the frozen CLIP's premises (masked-object ranking,
expression retrieval); ``report`` assembles ``metrics.json`` and the summary; ``viz`` and ``inspect``
draw maps over images. Ground truth is read here on purpose: nothing in this package feeds training.
"""
