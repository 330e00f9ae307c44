"""Command line: train a config for every seed, or search over it with Optuna.

    python main.py --run_config configs/run_template.yaml
    python main.py --run_config configs/run_template.yaml --set optimizer_config.lr=3e-4 --set seeds=[1,2]
    python main.py --run_config configs/run_template.yaml --preflight
    python main.py --run_config configs/run_template.yaml --optimize_config configs/optimize_template.yaml
    python main.py --run_config configs/run_template.yaml --slurm configs/slurm.yaml   # a Slurm job

Bad input (a file, a key, a value) ends with one line on stderr and exit status 2;
nothing is written before every check has passed.
"""
import argparse
import dataclasses
import os
import sys

__version__ = "0.4.0"


class _Version(argparse.Action):
    """--version: read the package versions only when asked (no imports)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import PackageNotFoundError, version
        parts = [f"pytorch_template {__version__}"]
        for package in ("torch", "optuna", "wandb"):
            try:
                parts.append(f"{package} {version(package)}")
            except PackageNotFoundError:
                parts.append(f"{package} (not installed)")
        print(", ".join(parts))
        parser.exit()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run_config", required=True, metavar="YAML",
                        help="the experiment: model, optimizer, data, seeds, epochs")
    parser.add_argument("--optimize_config", metavar="YAML",
                        help="run an Optuna study over keys of the run config")
    parser.add_argument("--storage", metavar="URL",
                        help="the study's Optuna storage (e.g. postgresql+psycopg://host/db); "
                             "default runs/<project>/optuna.db")
    parser.add_argument("--workers", type=int, metavar="K",
                        help="run the search in K processes on this machine, sharing one study")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key, dotted for nested ones (repeatable): "
                             "--set optimizer_config.lr=3e-4")
    parser.add_argument("--device", help="override `device:` (auto, cpu, cuda, cuda:N, mps)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the unfinished seeds of this config's group from their checkpoints")
    parser.add_argument("--preflight", action="store_true",
                        help="build everything, run one batch, check it, print a table; write nothing")
    parser.add_argument("--slurm", metavar="YAML",
                        help="submit this command as a Slurm job (a search: a job array of --workers) "
                             "and return; see configs/slurm.yaml")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --slurm: print the script, submit nothing")
    parser.add_argument("--slurm-job", metavar="FOLDER", help=argparse.SUPPRESS)  # the script's own flag
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="print the versions of the template, torch, optuna and wandb")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Import paths in the YAML (net: mymodels.Net) resolve from the current folder too.
    sys.path.insert(1, os.getcwd())
    # Imported after --help has been answered, which so stays instant (no torch).
    from config import OptimizeConfig, RunConfig
    from engine.errors import ConfigError
    from engine.loader import parse_override

    job = None  # the Slurm job this process runs in (--slurm-job)
    try:
        for flag, value in (("--workers", args.workers), ("--storage", args.storage)):
            if value is not None and not args.optimize_config:  # never silently ignored
                raise ConfigError(flag, "", "only a search uses it: add --optimize_config YAML")
        if args.dry_run and not args.slurm:
            raise ConfigError("--dry-run", "", "only --slurm uses it")
        if args.slurm_job:  # inside the Slurm job: its signals checkpoint and requeue
            from engine import slurm_job
            job = slurm_job.start(args.slurm_job)
            args.storage = job.storage or args.storage  # a search's, from a file only its owner reads
        workers = 1 if args.workers is None else args.workers
        run_config = RunConfig.from_yaml(args.run_config)
        overrides = dict(parse_override(text) for text in args.set)
        flags = [f"--set {text}" for text in args.set]
        if args.device:
            overrides["device"] = args.device
            flags.append(f"--device {args.device}")
        if overrides:
            run_config = run_config.with_overrides(overrides,
                                                   source=f"{args.run_config} (with {' '.join(flags)})")
        if args.preflight:
            from engine.preflight import preflight
            return preflight(run_config)
        if args.slurm and not args.optimize_config:
            from engine import slurm
            return slurm.submit(args.slurm, slurm.training_job(run_config, args.resume), args.dry_run)
        if args.optimize_config:
            opt_config = OptimizeConfig.from_yaml(args.optimize_config)
            if args.storage:
                opt_config = dataclasses.replace(opt_config, storage=args.storage)
            if workers < 1:
                raise ConfigError("--workers", "", f"must be at least 1, got {workers}")
            if args.slurm:
                from engine import slurm
                job = slurm.search_job(run_config, opt_config, workers)
                return slurm.submit(args.slurm, job, args.dry_run)
            opt_config.check_against(run_config)
            run_config.check_device()
            from engine import distributed
            from engine.search import report_best, run_study, run_study_distributed, run_workers
            if distributed.world_size() > 1:  # torchrun: every trial on all ranks
                study = run_study_distributed(run_config, opt_config)
                distributed.teardown()
                if study is None:
                    return 0  # not rank 0: rank 0 reports
            elif workers > 1:
                command = argv if argv is not None else sys.argv[1:]
                study = run_workers(command, workers, run_config, opt_config)
            else:  # each of K workers runs with --workers 1, and draws no bar over the trials
                study = run_study(run_config, opt_config, worker=args.workers is not None)
            text, best_path = report_best(study, run_config)
            print(text)
            return 0 if best_path else 1
        from engine import distributed
        from engine.run import run
        if job is not None:  # a requeued or resubmitted Slurm job continues where it stopped
            args.resume = args.resume or job.resume(run_config)
        try:
            result = run(run_config, resume=args.resume, overrides=flags)
        finally:
            rank = distributed.rank()
            distributed.teardown()
        if rank == 0:
            print(result.summary())
        return 0 if result.values or result.busy else 1
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from engine.checkpoint import disk_full
        if disk_full(e) is None:
            raise
        print(f"error: {disk_full(e)}", file=sys.stderr)  # the first write that failed
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished epochs and checkpoints are kept" + (
            "" if args.slurm_job else  # the job's script says whether it requeues the job
            "; rerun with --resume to continue (a search continues with the same command)"), file=sys.stderr)
        if job is not None:
            job.stopped()  # no more requeues when the job's last runs made no progress
        return 130


if __name__ == "__main__":
    sys.exit(main())
