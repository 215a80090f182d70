"""Interim (issue 25.2, step 1): ``python -m training_core.eval`` runs ``scoring.main`` until the split."""

from training_core.eval.scoring import main

if __name__ == "__main__":
    raise SystemExit(main())
