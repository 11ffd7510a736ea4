"""A run's folder and its records: the files a run writes (`files`), its owner and history (`folder`), checkpoints,
the ledger of every run, replay/rollback/smoke checks, and the tasks that leave no folder (`scratch`)."""
