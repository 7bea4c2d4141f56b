"""Analysis behind the paper's figures 3-5: per-layer query outputs of a model on a dataset
(:mod:`~rankdetr.analysis.collect`), statistics on them (:mod:`~rankdetr.analysis.stats`), COCO
precision-recall curves (:mod:`~rankdetr.analysis.pr`), and what the tools/plot_*.py commands
share (:mod:`~rankdetr.analysis.loading`)."""
