"""Training jobs: durable records, the Celery app that carries their ids, the task, the run, the reconciler.

One concern per module, and importing any of them connects to nothing, creates no files and
imports no TensorFlow:
- `records`: `JobStore`, the job table and its guarded status changes (the source of truth);
- `app`: `make_celery(settings)`, the queue and task names, `enqueue(app, job_id)`;
- `tasks`: the thin task a worker runs, and the worker child's GPU set-up;
- `runner`: `run_job`, a job's run with its heartbeat, throttled cancel checks and attempt fencing;
- `reconciler`: requeue lost runs, re-send lost messages, kill runs that ignore a cancel, sweep leftovers;
- `worker`: what `celery -A training.jobs.worker worker -Q training --concurrency 1` loads;
- `cli`: `python -m training.jobs reconcile [--every N] [--lost-after S]`.
"""
