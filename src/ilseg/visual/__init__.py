"""What people look at: panels of image / ground truth / predictions (:mod:`~ilseg.visual.panels`),
``ilseg predict`` on any image (:mod:`~ilseg.visual.predict`) and the previews a run draws after each step
(:mod:`~ilseg.visual.preview`).
"""
