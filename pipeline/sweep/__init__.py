"""Sweeps: one MLflow parent run per Hydra multirun, every job a child run; resume by config hash.

The Hydra callback (registered in conf/hydra/default.yaml) opens the parent run when a multirun
starts and passes its id to the jobs through the environment (so it reaches joblib workers and SLURM
jobs too); at the end it logs a summary table of the children to the parent and closes it.

Nothing is lost or done twice when sweeps overlap or stop:

- the parent is found or created under a file lock per sweep (`paths.cache_dir/sweeps/`), and every
  process running the sweep registers there: the same sweep started twice shares one parent, and the
  last process to end closes it;
- a job runs under a file lock on its config (`claim`): a second process waits for it, then skips it;
- each job writes `job_status.json` into its folder; at the end the sweep prints the jobs that did not
  finish, with their errors, in one block, and `python -m pipeline` exits 1;
- SIGTERM or Ctrl-C stops the workers (each closes its run KILLED), marks this process's running
  children KILLED and, unless another process still runs the sweep, the parent KILLED; a rerun resumes.

Jobs that run at once on one machine (joblib, submitit's local executor) set torch to their share of the
cores (`job_threads`), so that they do not slow each other down by oversubscribing them.
"""
from pipeline.sweep.callback import MLflowParentRun
from pipeline.sweep.jobs import (
                                 DONE,
                                 LAUNCHER_ENV,
                                 PARENT_ENV,
                                 SIZE_ENV,
                                 STATUS_FILE,
                                 claim,
                                 failure_block,
                                 finished_run,
                                 job_outcomes,
                                 launcher,
                                 parent_run_id,
                                 record_job,
)
from pipeline.sweep.processes import State, interrupted, register, stop_on_signal, workers
from pipeline.sweep.summary import SUMMARY_METRICS, headline, summary_rows, write_summary
from pipeline.sweep.threads import (
                                 concurrent_jobs,
                                 job_threads,
                                 machine_cores,
                                 set_job_threads,
                                 sweep_size,
                                 thread_share,
)

__all__ = ["DONE", "LAUNCHER_ENV", "PARENT_ENV", "SIZE_ENV", "STATUS_FILE", "SUMMARY_METRICS", "MLflowParentRun",
           "State", "claim", "concurrent_jobs", "failure_block", "finished_run", "headline", "interrupted",
           "job_outcomes", "job_threads", "launcher", "machine_cores", "parent_run_id", "record_job", "register",
           "set_job_threads", "stop_on_signal", "summary_rows", "sweep_size", "thread_share", "workers",
           "write_summary"]
