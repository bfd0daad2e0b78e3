"""Data layer: image/mask I/O, datasets, the synthetic benchmark, transforms, per-step lists."""
