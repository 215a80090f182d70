"""Evaluation: score a model's clusters against labels, beside the controls a user needs to read them.

Four methods (``methods``) each fit one set of cluster centres per dataset from pixels alone, then label every
tile: the trained model as ``runtime_export.segment`` runs it, its untrained twin (does training help on this
data?), k-means on the pixels' colours, and a constant (what an imbalanced label set gives for nothing).

Labels are only used here. The cluster-to-class mapping is fitted on ``metrics_train`` and scored on
``val`` (a dataset whose ``metrics_train`` holds no labeled pixel fits on ``val``, and the report says so),
at K = number of classes (Hungarian one-to-one and majority) and at K = 8 (majority, many-to-one).

Streaming: pass 1 reads every tile once and keeps only the fit samples (lattice cells, lattice pixels);
pass 2 reads every tile again and accumulates confusion matrices. One tile is in memory at a time.

CLI::

    python -m training_core.eval --synthetic --seed 7
    python -m training_core.eval --data-source shards --processed-root DIR --dataset-id ID --checkpoint PATH

prints the JSON report and writes it to ``--output``; a user error (a K outside the model's range, a missing
or damaged checkpoint or dataset, an unwritable output) is one line on stderr, exit 2.

Verdicts (``training_helped``, ``model_beats_baseline``) need a lead of more than ``DECISION_MARGIN``: the
report gives each difference beside the margin, so a near tie reads as one.

One job a module:

- ``report``: the report types (``EvalReport``, ``MethodReport``, ``Sample``), the methods' names and the
  verdicts (``DECISION_MARGIN``, ``verdicts``);
- ``methods``: the methods scored (the model's runtime, its untrained twin, k-means on RGB, the constant);
- ``tiles``: the labeled tiles, read through the raster layer (``read_tile``, ``SplitTiles``);
- ``scoring``: confusions and Hungarian/majority scores over a dataset (``evaluate_tiles``, ``evaluate_model``,
  ``evaluate_checkpoint``, ``evaluate_synthetic``);
- ``picture``: the comparison picture (``render_comparison``);
- ``__main__``: the CLI (``python -m training_core.eval``, ``segpipe-eval``).
"""
