"""Study tools, run from the repository's root: python -m lab.ablate (ablations), lab.search (the
hyperparameter search), lab.confirm (confirmations on fresh seeds)."""
