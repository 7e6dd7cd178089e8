"""Metrics between the step and the log: averaging over micro-steps, processes and the logging window (robust to
keys that only some batches carry, such as per-group metrics), and the trackers (TensorBoard, Weights & Biases,
MLflow) that receive every logged row. The metrics file itself is written by the trainer's ``_log``."""
import os
import warnings

import torch.distributed as dist


def mean_by_key(rows):
    """Per-key mean over the dicts that have the key (a key missing from a row is not a zero)."""
    sums, counts = {}, {}
    for row in rows:
        for k, v in row.items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}


def reduce_across_ranks(metrics, counts=None):
    """Mean of each metric over the processes that have it, weighted by ``counts`` (how many micro-batches
    each process averaged for the key; 1 when not given). Every process gets the same result. Keys may differ
    between processes (a group present in one process's batch only), so the keys travel with the values."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return dict(metrics)
    counts = counts or {}
    local = {k: (float(v) * counts.get(k, 1), counts.get(k, 1)) for k, v in metrics.items()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    sums, ns = {}, {}
    for part in gathered:
        for k, (s, n) in part.items():
            sums[k] = sums.get(k, 0.0) + s
            ns[k] = ns.get(k, 0) + n
    return {k: sums[k] / ns[k] for k in sorted(sums)}


def micro_step_metrics(rows):
    """(mean per key, count per key) over an optimizer step's micro-batches."""
    counts = {}
    for row in rows:
        for k in row:
            counts[k] = counts.get(k, 0) + 1
    return mean_by_key(rows), counts


class Trackers:
    """The trackers named in ``report_to`` besides the metrics file, behind one ``add_scalar(key, value, step)``
    and ``close()``. Opened on the main process only. A tracker that is not installed: tensorboard warns and is
    skipped (the metrics file still has everything); wandb and mlflow are refused when the config is built."""

    def __init__(self, config):
        self.writers = []
        reports = config.reports
        run_name = config.run_name or os.path.basename(os.path.normpath(config.output_dir))
        if "tensorboard" in reports:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("report_to includes 'tensorboard' but tensorboard is not installed "
                              "(pip install tensorboard); logging to metrics.jsonl only", stacklevel=3)
            else:
                tb = SummaryWriter(os.path.join(config.output_dir, "tensorboard"))
                self.writers.append((tb.add_scalar, tb.close))
        if "wandb" in reports:
            import wandb
            run = wandb.init(name=run_name, config=config.to_dict(), dir=config.output_dir, reinit=True)
            self.writers.append((lambda k, v, step: run.log({k: v}, step=step), run.finish))
        if "mlflow" in reports:
            import mlflow
            mlflow.start_run(run_name=run_name)
            mlflow.log_params({k: str(v)[:250] for k, v in config.to_dict().items()})
            self.writers.append((lambda k, v, step: mlflow.log_metric(k.replace("@", "_"), v, step=step),
                                 mlflow.end_run))

    def __bool__(self):
        return bool(self.writers)

    def add_scalar(self, key, value, step):
        for add, _ in self.writers:
            add(key, value, step)

    def close(self):
        for _, close in self.writers:
            close()
        self.writers = []

