"""The run folder's format: layout, lock, saved config and its history (:mod:`~ilseg.runs.folder`), checkpoints
and their identity (:mod:`~ilseg.runs.checkpoint`), and the results files (:mod:`~ilseg.runs.results`).

The engine writes run folders; ``ilseg eval``, ``predict``, ``report``, ``import`` and the demo read them.
This package imports nothing of :mod:`ilseg.engine`.
"""
