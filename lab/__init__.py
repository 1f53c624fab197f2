"""Study tooling: multi-seed ablations and confirmations (lab.ablate), the hyperparameter search (lab.search)."""
