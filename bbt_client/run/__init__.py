"""One tuning run's lifecycle: the job loop, its scorer, budgets and ledger, checkpoints, results."""
