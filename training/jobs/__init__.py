"""Training jobs and dataset ingests: durable records, the Celery app that carries their ids, the tasks, the run,
the reconciler.

One concern per module, and importing any of them connects to nothing, creates no files and
imports no TensorFlow:
- `records`: `JobStore`, the job table and its guarded status changes (the source of truth);
- `app`: `make_celery(settings)`, the queue and task names, `enqueue(app, job_id)`,
  `enqueue_ingest(app, dataset_id)`;
- `tasks`: the thin tasks the workers run (train a job, ingest a dataset), and a training child's GPU set-up;
- `runner`: `run_job`, a job's run with its heartbeat, throttled cancel checks and attempt fencing;
- `reconciler`: requeue lost runs, re-send lost messages and ingests, kill runs that ignore a cancel, sweep
  leftovers;
- `worker`: what `celery -A training.jobs.worker worker -Q training --concurrency 1` (a training worker, one
  per GPU) and `... worker -Q ingest` (an ingest worker, CPU only) load;
- `cli`: `python -m training.jobs reconcile [--every N] [--lost-after S]`.
"""
