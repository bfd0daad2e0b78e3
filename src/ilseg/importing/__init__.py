"""``ilseg import``: MiB, PLOP and cssegmentation step checkpoints turned into an ilseg run folder (docs/importing.md)."""
