"""The template's machinery. You should not need to edit anything in here: your model goes in
model.py, your data and metrics in util.py, your experiment in a YAML file under configs/.

    errors.py           ConfigError: bad input, reported as one line naming the file and the key
    resolve.py          the one import-path resolver, the check of keyword arguments, build_model
    trust.py            what a config read back from a run folder may name (analyze.py, load_run)
    loader.py           YAML in, typed dataclasses out: coercion, overrides, hashes
    contract.py         what the engine asks of your model: LossStep (a batch's loss), predict()
    trainer.py          Trainer: the one loop, for one model or a stack of seeds; one optimizer step
    vectorized.py       SeedStack: a stack of seeds' step as one (torch.func.vmap)
    stacking.py         why_not(): whether a config's seeds can train together, decided before training
    settings.py         Settings: all the Trainer reads, checked when built
    batches.py          how the loop draws batches (in-memory tensors, DataLoader, torchrun ranks)
    stopping.py         how training stops on a signal, with a checkpoint of where it stood
    run.py              run(): one model per seed, together or one by one, each under its lock
    seed_files.py       one seed's folder: what it writes, and which checkpoint a resume takes
    folders.py          runs/<project>/<group>/: where results go, and the checks before writing
    locks.py            the per-seed flocks, and whether the file system under runs/ gives them
    wandb_run.py        one wandb run per seed, offline without credentials; a group's offline runs
    checkpoint.py       atomic writes, weights-only loads, RNG states
    reproducibility.py  seeding, the deterministic switch, a oneMKL workaround
    distributed.py      torchrun's process group and the few collectives the loop needs
    search.py           the Optuna study whose trials are run() calls
    studies.py          where a study is, and Optuna Dashboard over it
    plots.py            the PNGs analyze.py draws
    report.py           a study's report: best trial, importances, edge warnings, PNGs
    search_space.py     the search space's checks, and sampling it through a trial
    pruner.py           PFLPruner, the predicted-final-loss pruner
    preflight.py        --preflight: what the first epoch runs, checked, stage by stage
    provenance.py       provenance.json: how to reproduce a group
    slurm.py            --slurm: the Slurm YAML, the sbatch script, submission
    slurm_job.py        inside a Slurm job: its signals, srun's tasks as ranks, resume, requeue limits

Nothing in here imports your files (main, config, model, util, analyze): your code reaches
the engine through the import paths in your config. Importing the package imports no torch.
"""
