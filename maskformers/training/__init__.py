"""Training: matcher, criterion and point sampling, data, loop, checkpoints, distributed.

Nothing here is imported by ``import maskformers``; import the submodules you need, e.g.
``from maskformers.training.criterion import MaskFormerCriterion``.
"""
