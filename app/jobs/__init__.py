"""Fine-tuning jobs: creation and its checks, the run protocol, the queue contract, the sweep.

- `service`: create, list, cancel jobs; their events and checkpoints (the API's side).
- `spec`: the run spec, what a job runs (typed, resolved); the API stores it, the worker reads it.
- `hyperparameters`: the job's hyperparameters resolved against the base model.
- `limits`: bounds on the work one job may ask for.
- `runs`: the run protocol: claiming a job, its lease, ending an attempt (the worker's
  calls), and the sweep's recovery of dead attempts.
- `queue`: the Celery wake-up message shared by the API and the workers.
- `sweep` and `leftovers`: re-sending lost wake-ups, re-queuing dead attempts, removing what
  they left behind.
"""
