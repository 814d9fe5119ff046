"""The sweep driver: a validated space and a base pretrain config -> a Ray Tune experiment -> MLflow parent run.

Each trial is one Ray Train run with one worker (one GPU when the cluster has GPUs); a trial whose node
or worker is lost is restarted (`trial_retries` times: Ray Train restarts the worker from its last
checkpoint, Tune restarts a trial whose own actor died; both continue the same MLflow run), while a
trial that failed for its own reason (NaN loss) stays failed. Optuna's TPE
(seeded) proposes configs unless the space has grid entries; ASHA optionally stops poor trials.
The experiment lives in <storage>/<sweep_id>; `resume=True` restores it (Tuner.restore) and
continues the same parent run. At the end: trials table, best config YAML, plots, all in MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlpscale import tracking
from mlpscale.config import PretrainConfig, save_yaml, validate
from mlpscale.errors import MlpscaleError
from mlpscale.paths import repo_root
from mlpscale.ray_cluster import cpus_per_gpu_worker, ensure_ray
from mlpscale.tracking import sweeps
from mlpscale.tune import report
from mlpscale.tune.space import SearchSpace, check_against_config, load_space, parse_space
from mlpscale.tune.trial import LR_SCALINGS, SweepContext, run_trial, trial_config

log = logging.getLogger(__name__)

SWEEP_FILE = "mlpscale_sweep.json"
SCHEDULERS = ("none", "asha")
MODES = ("max", "min")


@dataclass
class SweepOptions:
    """How to search (the base pretrain config says what to train)."""

    space: str
    num_samples: int = 8
    max_concurrent: int | None = None
    scheduler: str = "none"
    metric: str = "val_top1"
    mode: str = "max"
    lr_scaling: str = "none"
    base_batch_size: int | None = None
    seed: int = 0
    grace_period: int = 1
    reduction_factor: int = 2
    name: str | None = None
    storage_path: str | None = None
    trial_retries: int = 2  # restarts after a lost node or crashed worker; a NaN or config failure stays final

    def check(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise MlpscaleError(f"--scheduler {self.scheduler!r} is not known; use one of {', '.join(SCHEDULERS)}")
        if self.mode not in MODES:
            raise MlpscaleError(f"--mode {self.mode!r} is not known; use max or min")
        if self.metric not in tracking.EPOCH_METRICS:
            raise MlpscaleError(
                f"--metric {self.metric!r} is not reported per epoch; use one of {', '.join(tracking.EPOCH_METRICS)}"
            )
        if self.lr_scaling not in LR_SCALINGS:
            raise MlpscaleError(f"--lr-scaling {self.lr_scaling!r} is not known; use one of {', '.join(LR_SCALINGS)}")
        for key in ("num_samples", "grace_period"):
            if getattr(self, key) < 1:
                raise MlpscaleError(f"--{key.replace('_', '-')} must be at least 1; got {getattr(self, key)}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise MlpscaleError(f"--max-concurrent must be at least 1; got {self.max_concurrent}")
        if self.trial_retries < 0:
            raise MlpscaleError(f"--trial-retries must be 0 or more; got {self.trial_retries}")
        if self.reduction_factor < 2:
            raise MlpscaleError(f"--reduction-factor must be at least 2; got {self.reduction_factor}")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise MlpscaleError(f"--name {self.name!r} may only use letters, digits, '_', '.' and '-'")


@dataclass
class SweepResult:
    """What a sweep left: its runs, table and best config; `report.summary` turns it into the job's printout."""

    sweep_id: str
    parent_run_id: str
    experiment_dir: Path
    table: Any  # pandas.DataFrame, one row per child run
    best: dict[str, Any] = field(default_factory=dict)
    best_config_path: Path | None = None
    errors: int = 0
    fields: list[str] = field(default_factory=list)  # the searched config fields (the table's config columns)
    metric: str = "val_top1"
    experiment: str = ""  # the MLflow experiment of the parent run


def storage_root(options: SweepOptions) -> Path:
    """Where Tune experiments live: --storage-path or <repo>/ray_results (absolute)."""
    return Path(options.storage_path).expanduser().resolve() if options.storage_path else repo_root() / "ray_results"


def run_sweep(base: PretrainConfig, options: SweepOptions, *, resume: bool = False) -> SweepResult:
    """Run (or resume) a sweep; trial failures are recorded, never raised."""
    options.check()
    if options.storage_path is None and base.storage_path:
        options = dataclasses.replace(options, storage_path=base.storage_path)
    if resume:
        base, options, state = _load_state(options)
    else:
        state = None
    validate(base)
    space = load_space(options.space) if state is None else parse_space(state["space"], source=state["space_file"])
    check_against_config(space, base)
    uri = state["tracking_uri"] if state else tracking.resolve_tracking_uri(base.tracking_uri)

    from mlpscale.train.pretrain import check_data

    check_data(base)  # the dataset must exist before any trial starts
    ensure_ray()
    import ray

    use_gpu = base.use_gpu if base.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
    max_concurrent, cpus_per_worker = _concurrency(options, use_gpu)

    if state is None:
        sweep_id = options.name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
        experiment_dir = storage_root(options) / sweep_id
        if (experiment_dir / SWEEP_FILE).exists():
            raise MlpscaleError(
                f"sweep {sweep_id!r} already exists in {experiment_dir.parent}; pass --resume to "
                f"continue it or choose another --name"
            )
        parent_run_id, _ = sweeps.start_sweep_run(
            uri, base.experiment, sweep_id, params=_sweep_params(options, space, max_concurrent)
        )
        experiment_dir.mkdir(parents=True, exist_ok=True)
        space_copy = experiment_dir / "search_space.yaml"
        space_copy.write_text(Path(options.space).read_text())
        tracking.log_file_artifact(tracking.client(uri), parent_run_id, space_copy)
        tracking.log_dict_artifact(tracking.client(uri), parent_run_id, base.to_dict(), "base_config.yaml")
        state = {
            "sweep_id": sweep_id,
            "parent_run_id": parent_run_id,
            "tracking_uri": uri,
            "base_config": base.to_dict(),
            "options": dataclasses.asdict(options),
            "space": space.to_dict(),
            "space_file": str(options.space),
        }
        (experiment_dir / SWEEP_FILE).write_text(json.dumps(state, indent=2))
    else:
        sweep_id, parent_run_id = state["sweep_id"], state["parent_run_id"]
        experiment_dir = storage_root(options) / sweep_id
        sweeps.reopen_run(uri, parent_run_id)
    log.info("sweep %s: MLflow parent run %s, experiment dir %s", sweep_id, parent_run_id, experiment_dir)

    context = SweepContext(
        sweep_id=sweep_id,
        parent_run_id=parent_run_id,
        tracking_uri=uri,
        experiment=base.experiment,
        base_config=base,
        train_storage=str(experiment_dir / "train"),
        lr_scaling=options.lr_scaling,
        base_batch_size=options.base_batch_size or base.batch_size,
        cpus_per_worker=cpus_per_worker,
        use_gpu=bool(use_gpu),
        trial_retries=options.trial_retries,
    )
    for value in _sample_extremes(space):
        trial_config(context, value)  # every sampled value must give a valid config
    results = _fit(context, space, options, experiment_dir, max_concurrent, resume)
    return _finish(context, space, options, experiment_dir, results, base)


def _concurrency(options: SweepOptions, use_gpu: bool) -> tuple[int, int]:
    """(trials at a time, CPUs per trial's worker): one trial per GPU, or the CPUs shared between trials.

    An explicit --max-concurrent on GPUs is kept as given: an autoscaling cluster adds GPU nodes for
    the trials waiting beyond the GPUs present now.
    """
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    if use_gpu:
        present = max(1, gpus)
        max_concurrent = options.max_concurrent or present
        return max_concurrent, cpus_per_gpu_worker(cpus, present)
    max_concurrent = options.max_concurrent or max(1, cpus)
    max_concurrent = min(max_concurrent, max(1, cpus))
    return max_concurrent, max(1, cpus // max_concurrent)


def _sweep_params(options: SweepOptions, space: SearchSpace, max_concurrent: int) -> dict[str, Any]:
    searcher = "random+grid (BasicVariantGenerator)" if space.has_grid else "optuna TPE (OptunaSearch)"
    return {
        "search_space_file": options.space,
        "searcher": searcher,
        "searcher_seed": options.seed,
        "scheduler": options.scheduler,
        "metric": options.metric,
        "mode": options.mode,
        "num_samples": options.num_samples,
        "max_concurrent": max_concurrent,
        "lr_scaling": options.lr_scaling,
        "trial_retries": options.trial_retries,
        "searched_fields": ",".join(space.fields),
        **(
            {"asha_grace_period": options.grace_period, "asha_reduction_factor": options.reduction_factor}
            if options.scheduler == "asha"
            else {}
        ),
    }


def _sample_extremes(space: SearchSpace) -> list[dict[str, Any]]:
    from mlpscale.tune.space import tune_value

    lows, highs = {}, {}
    for p in space.params:
        if p.values is not None:
            lows[p.field], highs[p.field] = tune_value(p.values[0]), tune_value(p.values[-1])
        else:
            lows[p.field], highs[p.field] = p.low, p.high
    return [lows, highs]


def _searcher(space: SearchSpace, options: SweepOptions, max_concurrent: int):
    if space.has_grid:
        from ray.tune.search import BasicVariantGenerator

        log.info("the space has grid entries: random search over the rest, every grid point (no Optuna)")
        return BasicVariantGenerator(random_state=options.seed, max_concurrent=max_concurrent)
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(
        metric=options.metric, mode=options.mode, sampler=optuna.samplers.TPESampler(seed=options.seed)
    )
    return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)


def _scheduler(options: SweepOptions, epochs: int):
    """ASHA with its rungs before the last epoch: a trial that reaches the last epoch is never stopped there
    (Tune would kill it while it logs its model)."""
    if options.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    last_rung = max(1, epochs - 1)
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=last_rung,
        grace_period=min(options.grace_period, last_rung),
        reduction_factor=options.reduction_factor,
        stop_last_trials=False,
    )


def _placement_group_cleanup(context: SweepContext):
    """A Tune callback removing a trial's worker-group placement group when Tune ends the trial.

    A trial Tune stops (ASHA) dies with its Train controller, which leaves the worker group's placement
    group behind; Ray Train's own cleaner needs the state API, which fails e.g. with several Ray
    instances on one machine. Left there, it would hold the CPU/GPU later trials wait for.
    """
    from ray import tune

    class PlacementGroupCleanup(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            _remove_placement_groups(context, trial_id=trial.trial_id)

        def on_trial_error(self, iteration, trials, trial, **info):
            _remove_placement_groups(context, trial_id=trial.trial_id)

    return PlacementGroupCleanup()


def _trainable(context: SweepContext):
    from ray import tune

    # The trial only waits on its Train worker, which holds the CPU/GPU; a token resource keeps it schedulable.
    return tune.with_resources(tune.with_parameters(run_trial, context=context), {"memory": 1})


def _fit(
    context: SweepContext,
    space: SearchSpace,
    options: SweepOptions,
    experiment_dir: Path,
    max_concurrent: int,
    resume: bool,
):
    from ray import tune

    from mlpscale.tune.space import to_tune_space

    trainable = _trainable(context)
    if resume and tune.Tuner.can_restore(str(experiment_dir)):
        log.info("restoring the Tune experiment in %s", experiment_dir)
        tuner = tune.Tuner.restore(
            str(experiment_dir),
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
        )
    else:
        epochs = context.base_config.epochs
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune_space(space),
            tune_config=tune.TuneConfig(
                metric=options.metric,
                mode=options.mode,
                search_alg=_searcher(space, options, max_concurrent),
                scheduler=_scheduler(options, epochs),
                num_samples=options.num_samples,
                max_concurrent_trials=max_concurrent if space.has_grid else None,
            ),
            run_config=tune.RunConfig(
                name=experiment_dir.name,
                storage_path=str(experiment_dir.parent),
                failure_config=tune.FailureConfig(max_failures=options.trial_retries),
                verbose=1,
                callbacks=[_placement_group_cleanup(context)],
            ),
        )
    results = tuner.fit()
    _remove_placement_groups(context)
    return results


def _remove_placement_groups(context: SweepContext, trial_id: str | None = None) -> None:
    """Remove the worker-group placement groups still held by the sweep's (or one trial's) finished runs."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    try:
        runs = sweeps.trial_runs(context.tracking_uri, context.parent_run_id, trial_id=trial_id)
        table = ray.util.placement_group_table()
    except Exception as error:  # noqa: BLE001 - cleanup must never end the sweep
        log.warning("could not look up placement groups to clean up: %s", error)
        return
    for hex_id in sweeps.placement_groups(runs):
        if table.get(hex_id, {}).get("state") in ("CREATED", "PENDING", "RESCHEDULING"):
            log.info("removing placement group %s left by a stopped trial", hex_id)
            try:
                ray.util.remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(hex_id)))
            except Exception as error:  # noqa: BLE001 - already gone
                log.debug("placement group %s: %s", hex_id, error)


def _finish(
    context: SweepContext,
    space: SearchSpace,
    options: SweepOptions,
    experiment_dir: Path,
    results,
    base: PretrainConfig,
) -> SweepResult:
    uri = context.tracking_uri
    sweeps.reconcile_trial_runs(uri, context.parent_run_id)
    table = sweeps.trials_table(uri, context.parent_run_id, space.fields, options.metric, options.mode)
    files = [(path, None) for path in report.write_table(table, experiment_dir)]
    files += [
        (path, "plots") for path in report.write_plots(table, space, options.metric, options.mode, experiment_dir)
    ]
    best, best_path = _best(context, table, options, experiment_dir)
    if best_path is not None:
        files.append((best_path, None))
    errors = sum(1 for r in results if r.error is not None) if results is not None else 0
    sweeps.log_sweep_summary(uri, context.parent_run_id, best=best, files=files)
    return SweepResult(
        context.sweep_id,
        context.parent_run_id,
        experiment_dir,
        table,
        best,
        best_path,
        errors,
        fields=list(space.fields),
        metric=options.metric,
        experiment=context.experiment,
    )


def _best(context: SweepContext, table, options: SweepOptions, experiment_dir: Path):
    column = f"best_{options.metric}"
    finished = table[(table["status"] == "FINISHED") & table[column].notna()]
    if finished.empty:
        return {}, None
    row = finished.loc[finished[column].idxmax() if options.mode == "max" else finished[column].idxmin()]
    from mlpscale.config import apply

    cfg = apply(PretrainConfig(), sweeps.run_config_artifact(context.tracking_uri, row["run_id"]))
    cfg = dataclasses.replace(cfg, run_name=None, tracking_uri=None)
    path = save_yaml(cfg, experiment_dir / "best_config.yaml")
    return {"best_trial_id": row["trial_id"], "best_run_id": row["run_id"], column: float(row[column])}, path


def _load_state(options: SweepOptions) -> tuple[PretrainConfig, SweepOptions, dict[str, Any]]:
    """The base config, options and parent run of the sweep to resume (by --name, else the newest)."""
    root = storage_root(options)
    if options.name:
        state_file = root / options.name / SWEEP_FILE
    else:
        candidates = sorted(root.glob(f"*/{SWEEP_FILE}"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise MlpscaleError(f"no sweep to resume under {root}; pass --name (and --storage-path) of a sweep")
        state_file = candidates[-1]
    if not state_file.is_file():
        raise MlpscaleError(
            f"no sweep named {options.name!r} under {root}; pass the --name and --storage-path "
            f"the sweep was started with"
        )
    state = json.loads(state_file.read_text())
    from mlpscale.config import apply

    base = apply(PretrainConfig(), state["base_config"])
    saved = SweepOptions(**state["options"])
    saved.name, saved.storage_path = state["sweep_id"], str(root)
    return base, saved, state
