"""Atypical vs normal mitotic figure classification for MIDOG 2025 track 2.

The inference wing (``io``, ``network``, ``predict``) is what the container runs; the training wing
(``targets``, ``augment``, ``data``, ``losses``, ``train``, ``evaluate``, ``stacks``) builds and scores
the fold checkpoints it loads.
"""
