"""Study tools, run from the repository's root: python -m lab.ablate (ablations), lab.search (the
hyperparameter search), lab.confirm (confirmations on fresh seeds), lab.compare (studies side by side,
seed by seed), lab.diagnose (how a run spent its steps, or how a saved agent's episodes end), lab.stop_rules (stop
rules replayed on a run's saved checkpoints) and lab.head_to_head (time to a landed lander against SB3's
tuned SAC, TQC and CrossQ)."""
