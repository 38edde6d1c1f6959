"""The `pipeline` command line: parse, call the Python API (pipeline/api.py) or a launcher, map its
exceptions to exit codes and print. Nothing else.

Exit codes: 0 done; 1 training failed; 2 usage, config or input error (raised before anything starts);
75 preempted with a committed checkpoint (requeue me).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import typer

from pipeline import secrets
from pipeline.config import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PREEMPTED = 0, 1, 2, 75

app = typer.Typer(
    help="Fault-tolerant distributed training: Ray Train + DeepSpeed ZeRO + WebDataset.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Prepare, index and inspect WebDataset shards.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    # scrubbed: an error (s3fs's, a worker's traceback) may quote a credential of the config
    typer.echo(f"error: {secrets.scrub(message)}", err=True)
    raise typer.Exit(code)


def _parse_classes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        out: list[int] = []
        for part in text.split(","):
            low, _, high = part.partition("-")
            out += list(range(int(low), int(high) + 1)) if high else [int(low)]
        return out
    except ValueError:
        raise ConfigError(f"--classes {text!r}: use labels like 0-4 or 5,7,9") from None


@data_app.command("prepare")
def data_prepare(
    source: str = typer.Argument(
        ...,
        help="digits | mnist5k | imagefolder:PATH | npz:PATH | synthetic-images:COUNT[:HxW] | "
        "text:PATH (a file, a dir of .txt files, a glob) | text-stdlib",
    ),
    out: Path = typer.Option(..., "--out", help="directory to write shards + MANIFEST.json into"),
    samples_per_shard: int = typer.Option(128, "--samples-per-shard", help="max samples per tar shard"),
    shard_size_mb: float = typer.Option(0.0, "--shard-size-mb", help="target shard size in MB (0: off)"),
    val_fraction: float = typer.Option(
        None, "--val-fraction", help="fraction held out: stratified (default 0.2); text: its end (0.1)"
    ),
    seed: int = typer.Option(0, "--seed", help="seed of the train/val split"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace --out if it is a dataset `data prepare` wrote (or empty)"
    ),
    classes: str = typer.Option(None, "--classes", help="keep only these labels, e.g. 0-4 or 5,7,9"),
    train_fraction: float = typer.Option(1.0, "--train-fraction", help="keep this fraction of train"),
    seq_len: int = typer.Option(128, "--seq-len", help="text: tokens per window (each sample holds +1)"),
    vocab: str = typer.Option(
        "char", "--vocab", help="text: char (the text's characters; UTF-8) | byte (256 values; any file)"
    ),
) -> None:
    """Write a real dataset as WebDataset tar shards with a MANIFEST (counts + sha256).

    Text (text:PATH, text-stdlib) becomes token windows for task.name=language_model: a char (or byte)
    vocabulary in the MANIFEST, train = the first 1 - val_fraction of the text, val = the rest, windows
    of --seq-len + 1 tokens as .npy samples."""
    from pipeline.data import shards, sources, text

    if text.is_text_source(source):
        try:
            manifest = text.write_text_prepared(
                text.load_text_source(source),
                out,
                seq_len=seq_len,
                vocab=vocab,
                samples_per_shard=samples_per_shard,
                val_fraction=text.DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction,
                seed=seed,
                overwrite=overwrite,
            )
        except ConfigError as e:
            _fail(str(e))
        for split, info in manifest["splits"].items():
            typer.echo(
                f"{split}: {info['tokens']} tokens, {info['samples']} windows in "
                f"{len(info['shards'])} shard(s)"
            )
        typer.echo(
            f"wrote {out}/MANIFEST.json ({manifest['source']}, {manifest['vocab']} vocabulary of "
            f"{manifest['num_classes']}, windows of {seq_len} + 1 tokens)"
        )
        return
    try:
        src = sources.load_source(source)
        manifest = shards.write_prepared(
            src,
            out,
            samples_per_shard=samples_per_shard,
            shard_size_mb=shard_size_mb,
            val_fraction=0.2 if val_fraction is None else val_fraction,
            seed=seed,
            overwrite=overwrite,
            classes=_parse_classes(classes),
            train_fraction=train_fraction,
        )
    except ConfigError as e:
        _fail(str(e))
    for split, info in manifest["splits"].items():
        typer.echo(f"{split}: {info['samples']} samples in {len(info['shards'])} shard(s)")
    typer.echo(f"wrote {out}/MANIFEST.json ({manifest['source']}, shape {manifest['sample_shape']})")


@data_app.command("index")
def data_index(
    shards_arg: str = typer.Argument(
        ...,
        metavar="SHARDS",
        help="your existing shards: a dir of .tar files, a brace pattern (dir/shard-{000000..000009}.tar), "
        "s3://bucket/prefix/, pipe: commands; a.tar::b.tar joins several",
    ),
    out: str = typer.Option(..., "--out", help="where MANIFEST.json goes (the shards' dir, or another)"),
    val: str = typer.Option(None, "--val", help="val shards (same forms as SHARDS)"),
    val_fraction: float = typer.Option(0.0, "--val-fraction", help="hold out this fraction of whole shards"),
    seed: int = typer.Option(0, "--seed", help="seed of --val-fraction and of the statistics sample"),
    input_key: str = typer.Option(
        None, "--input", help="the input's key (data.fields.input), e.g. input.npy"
    ),
    target_key: str = typer.Option(
        None, "--target", help="the target's key (data.fields.target), e.g. target.cls or json.label"
    ),
    decode: str = typer.Option(
        None,
        "--decode",
        help="your decode function (data.decode), 'pkg.module:function' or 'file.py:function'",
    ),
    storage_options: str = typer.Option(
        None, "--storage-options", help='fsspec options for s3:// as JSON, e.g. \'{"endpoint_url": "..."}\''
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing MANIFEST.json in --out"),
) -> None:
    """Read existing WebDataset shards once (never rewriting them) and write --out/MANIFEST.json: sample
    counts, sha256, keys, classes, input shape and normalisation, so `data.train=OUT` trains on them."""
    from pipeline.data import index

    try:
        try:
            options = json.loads(storage_options) if storage_options else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"--storage-options is not JSON: {e}") from None
        manifest = index.index_shards(
            shards_arg,
            out,
            val=val,
            val_fraction=val_fraction,
            seed=seed,
            input_key=input_key,
            target_key=target_key,
            decode=decode,
            storage_options=options,
            overwrite=overwrite,
            echo=typer.echo,
        )
    except ConfigError as e:
        _fail(str(e))
    for split, info in manifest["splits"].items():
        typer.echo(f"{split}: {info['samples']} samples in {len(info['shards'])} shard(s)")
    fields = manifest["fields"]
    how = (
        f"decode {manifest['decode']}"
        if manifest["decode"]
        else f"input {fields['input']}, target {fields['target']}"
    )
    typer.echo(
        f"wrote {out.rstrip('/')}/MANIFEST.json ({how}; {manifest['kind']} {manifest['sample_shape']}, "
        f"{manifest['num_classes']} classes)"
    )


@data_app.command("inspect")
def data_inspect(
    directory: Path = typer.Argument(
        ..., help="a directory with a MANIFEST.json (`pipeline data prepare` or `pipeline data index`)"
    ),
    no_verify: bool = typer.Option(False, "--no-verify", help="skip sha256 and sample counts"),
    allow_manifest_pipe: bool = typer.Option(
        False, "--allow-manifest-pipe", help="run the `pipe:` command the MANIFEST's root names (yours?)"
    ),
) -> None:
    """Print a dataset's counts, classes and shards; verify checksums (exit 2 if bad)."""
    from pipeline.data import shards

    try:
        manifest = shards.read_manifest(directory)
        problems = shards.inspect_prepared(directory, verify=not no_verify, allow_pipe=allow_manifest_pipe)
    except ConfigError as e:
        _fail(str(e))
    typer.echo(
        f"source {manifest['source']}, seed {manifest.get('seed')}, {manifest.get('kind', 'image')} "
        f"sample shape {manifest['sample_shape']}"
    )
    if manifest.get("root"):
        typer.echo(f"root {manifest['root']}")
    if manifest["format"] == shards.FORMAT_INDEXED:
        fields = manifest.get("fields") or {}
        typer.echo(
            f"decode {manifest['decode']}"
            if manifest.get("decode")
            else f"fields: input {fields.get('input')}, target {fields.get('target')}"
        )
        typer.echo(f"keys: {', '.join(manifest.get('keys', []))}")
    if manifest.get("kind") == "tokens":  # the symbols as one quoted string: they include \n and spaces
        symbols = f": {''.join(manifest['classes'])!r}" if manifest.get("vocab") == "char" else ""
        typer.echo(
            f"vocabulary {manifest.get('vocab')} ({manifest['num_classes']} tokens){symbols}; windows of "
            f"{manifest.get('seq_len')} + 1 tokens"
        )
    else:
        typer.echo(f"classes ({manifest['num_classes']}): {', '.join(manifest['classes'])}")
    for split, info in manifest["splits"].items():
        total = sum(s["bytes"] for s in info["shards"])
        typer.echo(
            f"{split}: {info['samples']} samples, {len(info['shards'])} shard(s), {total / 1e6:.2f} MB"
        )
    if problems:
        for p in problems:
            typer.echo(f"  BAD {p}", err=True)
        again = "index" if manifest["format"] == shards.FORMAT_INDEXED else "prepare"
        _fail(f"{len(problems)} problem(s) in {directory}; re-run `pipeline data {again}`")
    typer.echo("all shards verified" if not no_verify else "sizes checked (sha256 skipped)")


@app.command(context_settings={"allow_extra_args": False})
def train(
    config: Path = typer.Argument(..., help="run YAML, e.g. configs/smoke.yaml"),
    overrides: list[str] = typer.Argument(None, help="dotted key=value overrides, e.g. optim.lr=3e-4"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the resolved config and plan, then exit"),
    print_config: bool = typer.Option(False, "--print-config", help="print the resolved config YAML"),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="also show Ray's, DeepSpeed's and W&B's output (else: RUN_DIR/logs)"
    ),
) -> None:
    """Train: validate everything, then run the workers (Ray by default) to train.max_steps.

    Recipes (configs/): cnn, resnet18, lstm/gru over image rows, next-step prediction, (denoising)
    autoencoder, VAE and DCGAN (two engines): model.name + task.name, under any zero.stage;
    character-level LSTM/GRU language models on text shards (task.name=language_model; then
    `pipeline generate RUN --prompt TEXT`); PPO on Gymnasium environments (task.name=ppo, env.id).
    Your own code by import path ('package.module:Name' or 'path/to/file.py:Name'): model.name (an
    nn.Module), task.name (a pipeline.Task), data.decode (sample -> (input, target)); your own shards
    after `pipeline data index`. The same from Python: pipeline.train(config, **overrides).
    Re-running the same command resumes from the newest verified checkpoint (resume=auto);
    checkpoint.dir=s3://... mirrors checkpoints to object storage.
    Exit codes: 0 done, 1 training failed, 2 config/input error (nothing started),
    75 preempted by SIGTERM/SIGUSR1 with a committed checkpoint (re-run to resume).
    """
    from pipeline import api
    from pipeline import config as config_mod

    try:
        cfg = api.load_config(config, overrides or [])  # before torch is imported: a typo fails fast
        # A credential given as an override stays out of what reads this process's argv later (W&B's
        # run metadata, Ray's job table, spawned workers); `ps` still shows it: prefer the config file.
        sys.argv[:] = [secrets.scrub(arg) for arg in sys.argv]
        plan = api.prepare(cfg)
    except ConfigError as e:
        _fail(str(e))
    if print_config or dry_run:
        typer.echo(config_mod.dump_yaml(plan.cfg).rstrip())
    if dry_run:
        typer.echo("--- plan (dry run: nothing started, nothing written)")
        typer.echo(plan.describe())
        return
    from pipeline import launch, tracking

    if verbose:
        os.environ[tracking.VERBOSE_ENV] = "1"  # read by the launchers and, through them, the workers
    typer.echo(plan.describe())
    try:
        result = api.run(plan)
    except api.Preempted as e:
        typer.echo(
            f"preempted: checkpoint committed at step {e.result.step} ({e.result.checkpoint}); "
            "re-run the same command to resume"
        )
        raise typer.Exit(EXIT_PREEMPTED) from None
    except launch.TrainingFailed as e:
        _fail(f"training failed: {e}\n{_resume_hint(config, overrides or [])}", EXIT_FAILED)
    except ConfigError as e:
        _fail(str(e))
    evals = {k: v for k, v in result.metrics.items() if k.startswith("eval/") and isinstance(v, float)}
    typer.echo(f"final step {result.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in evals.items()))
    if "eval/accuracy" in result.metrics:
        typer.echo(f"final validation accuracy: {result.metrics['eval/accuracy']:.4f}")
    if result.checkpoint is not None:
        typer.echo(f"checkpoint: {result.checkpoint}")


def _resume_hint(config: Path, overrides: list[str]) -> str:
    """The command that resumes a failed run: the same one (resume=auto takes the newest verified
    checkpoint of the run dir). Inside a Slurm or Ray job, this command names the job's own cluster
    (an address that is gone once the job ends): the job is what to submit again."""
    if "SLURM_JOB_ID" in os.environ or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        return (
            "to resume from the last committed checkpoint, submit the job again the same way "
            "(`pipeline submit slurm|ray` with the same config and overrides)"
        )
    command = shlex.join(["pipeline", "train", str(config), *overrides])
    return f"to resume from the last committed checkpoint, re-run: {command}"


@app.command(context_settings={"allow_extra_args": False})
def sweep(
    config: Path = typer.Argument(
        ..., help="the run YAML every trial starts from, e.g. configs/cnn-mnist5k.yaml"
    ),
    sweep_file: Path = typer.Argument(..., metavar="SWEEP", help="the sweep YAML: a `sweep` section"),
    overrides: list[str] = typer.Argument(None, help="dotted key=value overrides of every trial's config"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the trials and their plan, then exit"),
) -> None:
    """Sweep hyperparameters: many pipeline runs over a search space, scheduled by Ray Tune.

    SWEEP has one `sweep` section: parameters (config key -> {choice|grid|uniform|loguniform|randint}),
    metric and mode (default: the run's best metric), num_trials, max_concurrent, search
    (random | grid | optuna: TPE, asked in batches of max_concurrent), scheduler ({asha: {grace_steps:
    N}} stops weak trials at their evaluations),
    seed. The sweep dir is the config's run_dir: each trial is a normal run in run_dir/trial_NNNN
    (checkpoints, exact resume, one W&B run in the sweep's group, tagged with its parameters).
    Re-running the same command continues an interrupted sweep: finished trials are kept, running
    ones resume from their checkpoints. At the end: run_dir/results.md (trials by the metric) and
    run_dir/best.yaml (`pipeline train run_dir/best.yaml` trains the best trial's config again).
    Exit codes: 0 every trial finished, 1 a trial failed, 2 config/sweep error (nothing started),
    75 a trial was preempted (SIGTERM) with a committed checkpoint: re-run (requeue) to continue.
    """
    from pipeline.launch import sweep as sweep_mod

    try:
        planned = sweep_mod.plan_sweep(str(config), str(sweep_file), overrides or [])
    except ConfigError as e:
        _fail(str(e))
    typer.echo(sweep_mod.describe(planned))
    if dry_run:
        typer.echo("--- dry run: nothing started, nothing written")
        return
    from pipeline.launch import tune

    planned.save()
    tune.run(planned, echo=typer.echo)
    best = sweep_mod.write_results(planned)
    typer.echo(sweep_mod.results_table(planned))
    if best is not None:
        typer.echo(f"best trial's config: {best} (pipeline train {best})")
    if interrupted := [t.id for t in planned.trials if t.status == "running"]:  # preempted: requeue me
        typer.echo(f"preempted: trial(s) {', '.join(interrupted)} committed a checkpoint; re-run to continue")
        raise typer.Exit(EXIT_PREEMPTED)
    if failed := [t.id for t in planned.trials if t.status not in sweep_mod.FINISHED]:
        _fail(
            f"trial(s) {', '.join(failed)} did not finish: re-run the same command to continue", EXIT_FAILED
        )


def _check_sweep(config: Path, sweep_file: Path | None, overrides: list[str]) -> None:
    """A submitted sweep's every trial checked as `pipeline sweep` checks it (ConfigError: exit 2)."""
    if sweep_file is not None:
        from pipeline.launch import sweep as sweep_mod

        sweep_mod.plan_sweep(str(config), str(sweep_file), overrides)


submit_app = typer.Typer(help="Submit a run to a Slurm or Ray cluster.", no_args_is_help=True)
app.add_typer(submit_app, name="submit")


@submit_app.command("slurm")
def submit_slurm(
    config: Path = typer.Argument(..., help="run YAML, e.g. configs/smoke.yaml"),
    overrides: list[str] = typer.Argument(None, help="dotted key=value overrides, e.g. slurm.nodes=2"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the rendered sbatch script, submit nothing"),
    wait: bool = typer.Option(False, "--wait", help="follow the job's log to its end; exit with its code"),
    sweep_file: Path = typer.Option(
        None, "--sweep", help="a sweep YAML: the job runs `pipeline sweep CONFIG SWEEP` instead of training"
    ),
) -> None:
    """Ray-on-Slurm: render slurm/ray-on-slurm.sbatch from the config's `slurm` section (partition,
    nodes, gpus_per_node, cpus_per_task, mem, time, account, signal_lead_s, extra_sbatch, setup) and
    sbatch it. The job starts a Ray head (and a Ray worker per further node) on ports derived from its
    job id, trains on the head, and on USR1 (signal_lead_s before the time limit, or
    `scancel --signal=USR1 --batch JOB`) commits a checkpoint and requeues itself; the requeued job
    resumes. Script, config snapshot and log: RUN_DIR/slurm/. With --sweep SWEEP.yaml the job runs
    `pipeline sweep` on its Ray cluster instead; requeued, the sweep continues (RUN_DIR/sweep.json)."""
    from pipeline import api
    from pipeline.launch import slurm

    try:
        cfg = api.prepare(api.load_config(config, overrides or [])).cfg  # local paths made absolute
        _check_sweep(config, sweep_file, overrides or [])
        roots = slurm.code_roots(cfg)
        if dry_run:
            typer.echo(slurm.render(cfg, Path.cwd(), sweep_file).rstrip())
        else:
            job_id, log_path = slurm.submit(cfg, Path.cwd(), sweep_file)
    except ConfigError as e:
        _fail(str(e))
    if roots:  # on stderr: a dry run's stdout is the script itself
        typer.echo(
            f"note: the job imports your code from {', '.join(roots)} on every node: it must be on a "
            "filesystem all nodes share, at the same path (the script puts it on PYTHONPATH)",
            err=True,
        )
    if dry_run:
        return
    typer.echo(f"submitted Slurm job {job_id}; log: {log_path}")
    if wait:
        raise typer.Exit(slurm.follow(job_id, log_path))


@submit_app.command("ray")
def submit_ray(
    config: Path = typer.Argument(..., help="run YAML, e.g. configs/smoke.yaml"),
    overrides: list[str] = typer.Argument(
        None, help="dotted key=value overrides, e.g. cluster.num_workers=4"
    ),
    address: str = typer.Option(..., "--address", help="the cluster's dashboard URL, e.g. http://HEAD:8265"),
    no_wait: bool = typer.Option(False, "--no-wait", help="submit and return; do not follow the logs"),
    py_modules: list[Path] = typer.Option(
        None,
        "--py-modules",
        help="more of your code to ship with the job: a package dir, a .py file or a .whl (repeatable)",
    ),
    sweep_file: Path = typer.Option(
        None, "--sweep", help="a sweep YAML: the job runs `pipeline sweep CONFIG SWEEP` instead of training"
    ),
) -> None:
    """Submit `pipeline train` (with --sweep SWEEP.yaml: `pipeline sweep`) as a Ray job (Job
    Submission API): the package code and the resolved config travel as the job's working dir, WANDB_*
    variables as its env. Your code that the config names by import path (model.name, task.name,
    data.decode: its package, or the .py file) and every --py-modules PATH travel with it (Ray's
    py_modules), so workers import them on every node; installed packages do not (the cluster's
    environment must have them). The submission id is derived from the run name and run dir:
    re-submitting follows the job while it runs, and after it failed or was stopped starts it again,
    resuming from the run dir's checkpoints (run_dir must be on storage every node sees). Exits with
    the job's driver exit code (0 done, 1 failed, 75 preempted)."""
    from pipeline import api
    from pipeline.launch import ray as ray_launcher

    try:
        cfg = api.prepare(api.load_config(config, overrides or [])).cfg
        if cfg.cluster.launcher != "ray":
            raise ConfigError("pipeline submit ray runs Ray Train workers: set cluster.launcher=ray")
        _check_sweep(config, sweep_file, overrides or [])
        sweep_text = sweep_file.read_text() if sweep_file is not None else None
        modules = [str(p) for p in py_modules or []]
        code = ray_launcher.submit_job(
            cfg, address, not no_wait, sys.stdout, py_modules=modules, sweep_text=sweep_text
        )
    except ConfigError as e:
        _fail(str(e))
    raise typer.Exit(code)


@app.command("bench")
def bench_cmd(
    names: list[str] = typer.Argument(
        ...,
        help="overhead, startup, loader, checkpoint, gpu, recipes, rl, memory, compile, sweep (what each "
        "measures: above)",
    ),
    json_out: Path = typer.Option(None, "--json", help="also write the rows as JSON to this file"),
    data: Path = typer.Option(
        Path("runs/.bench"), "--data", help="where the mnist5k and digits shards are (prepared if missing)"
    ),
    recipes: str = typer.Option(
        None,
        "--recipes",
        help="overhead: of cnn,resnet18,lstm,dcgan; compile: of cnn,resnet18,lstm; recipes: of cnn,resnet18,"
        "lstm-rows,gru-rows,lstm-next-row,autoencoder,vae,dcgan,lstm-lm-text,gru-lm-text; rl: of cartpole,"
        "acrobot (default: all)",
    ),
    stages: str = typer.Option("0,2", "--stages", help="overhead: which ZeRO stages, e.g. 0,1,2"),
    repeats: int = typer.Option(
        1, "--repeats", min=1, help="runs of each measurement (medians); rl: seeds 1..N of each recipe"
    ),
    samples: int = typer.Option(3000, "--samples", min=1, help="loader: synthetic JPEGs to write"),
    size: str = typer.Option("256x256", "--size", help="loader: their size in pixels, HxW"),
    jpegs: Path = typer.Option(None, "--jpegs", help="loader: a prepared dir of JPEG shards instead"),
    params_m: float = typer.Option(25.0, "--params-m", min=0.01, help="checkpoint: millions of parameters"),
    ckpt_dir: Path = typer.Option(None, "--dir", help="checkpoint: where to write (default: temp dir)"),
    images: int = typer.Option(20000, "--images", min=1, help="gpu: synthetic 224x224 JPEGs to train on"),
    batch: int = typer.Option(256, "--batch", min=1, help="gpu: batch size"),
    loader_workers: int = typer.Option(
        None, "--loader-workers", min=1, help="gpu: loader processes (default: cores - 2)"
    ),
    runs: Path = typer.Option(
        Path("runs"), "--runs", help="recipes, rl, sweep: where their run dirs go (replaced)"
    ),
    launcher: str = typer.Option("ray", "--launcher", help="recipes, rl: cluster.launcher, ray | local"),
) -> None:
    """Measure and print ratio tables, baseline and ours side by side in one run.

    \b
    overhead    steady-state s/step of `pipeline train` (ZeRO stages) against a plain DDP loop, input stall
    startup     `pipeline train` to its first step done, and how those seconds split
    loader      our stream against a raw tar read, and its decode rate against the cores' own
    checkpoint  checkpoint commit MB/s against dd, and the loop time lost per save
    gpu         ResNet-50 img/s and MFU in memory and through the pipeline, the LSTM recipe (needs CUDA)
    recipes     does each recipe learn (MNIST-5k; LMs: stdlib text): its eval against its goal, wall time
    rl          PPO on CartPole-v1 and Acrobot-v1: eval return vs goal and CleanRL, env steps/s, curve
    memory      ResNet-50 at 224 px with and without activation checkpointing: peak memory, s/step
    compile     s/step of the CNN, ResNet-18 and LSTM recipes with and without train.compile, compile time
    sweep       a 6-trial Ray Tune sweep of the CNN: best trial against the default, best.yaml re-trained

    overhead compares with a DDP loop (gloo, 2 processes, in-memory batches) on the same model, batch
    and precision, after a warm-up that covers the first epoch; startup warms the op cache first;
    overhead, startup, gpu, recipes and compile train the recipes in configs/ (run them from a checkout)."""
    import importlib

    from pipeline.bench import BENCHMARKS, BenchError, format_table

    if unknown := [n for n in names if n not in BENCHMARKS]:
        _fail(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHMARKS)}")
    modules = {name: importlib.import_module(f"pipeline.bench.{name}") for name in dict.fromkeys(names)}
    # which recipes each benchmark trains (--recipes names them in that benchmark's own terms)
    choices = {"overhead": "RECIPES", "recipes": "GOALS", "rl": "RECIPES", "compile": "RECIPES"}
    picked = {
        name: recipes.split(",") if recipes else list(getattr(modules[name], attr))
        for name, attr in choices.items()
        if name in modules
    }
    for name, chosen in picked.items():
        known = getattr(modules[name], choices[name])
        if unknown := [r for r in chosen if r not in known]:
            _fail(f"--recipes: {unknown[0]!r} is no recipe of bench {name}; choose from {', '.join(known)}")
    data, runs = data.resolve(), runs.resolve()  # training subprocesses run in the checkout
    rows: list[dict] = []
    try:
        if "gpu" in modules:
            modules["gpu"].check()  # no CUDA: exit 2 before any other benchmark spends its minutes
        _bench_data(data, list(modules))
        for name in names:
            bench = modules[name]
            if name == "overhead":
                stage_list = [int(s) for s in stages.split(",")]
                table = bench.run(picked[name], stage_list, data / "mnist5k", repeats)
            elif name == "startup":
                table = bench.run(data / "digits", repeats=max(3, repeats))
            elif name == "loader":
                table = bench.run(samples, size, jpegs, echo=typer.echo)
            elif name == "checkpoint":
                table = bench.run(params_m, ckpt_dir, echo=typer.echo)
            elif name == "gpu":
                table = bench.run(data / "mnist5k", images, batch, loader_workers, echo=typer.echo)
            elif name == "rl":
                table = bench.run(picked[name], runs, repeats, launcher, echo=typer.echo)
            elif name == "memory":
                table = bench.run(echo=typer.echo)
            elif name == "compile":
                table = bench.run(picked[name], data / "mnist5k", repeats, echo=typer.echo)
            elif name == "sweep":
                table = bench.run(data / "mnist5k", runs, echo=typer.echo)
            else:
                table = bench.run(picked[name], data / "mnist5k", runs, launcher, echo=typer.echo)
            typer.echo(format_table(f"--- {name}", table))
            rows += table
    except (BenchError, ConfigError) as e:
        _fail(str(e))
    if json_out:
        json_out.write_text(json.dumps(rows, indent=2) + "\n")


def _bench_data(root: Path, names: list[str]) -> None:
    """The MNIST-5k and digits shards under `root` that benchmarks `names` train on, prepared once
    (as `make smoke` and the recipes do)."""
    from pipeline.data import shards, sources

    mnist = {"overhead", "gpu", "recipes", "compile", "sweep"} & set(names)
    if mnist and not (root / "mnist5k" / "MANIFEST.json").is_file():
        shards.write_prepared(sources.mnist5k(), root / "mnist5k", samples_per_shard=250, overwrite=True)
    if "startup" in names and not (root / "digits" / "MANIFEST.json").is_file():
        shards.write_prepared(sources.digits(), root / "digits", overwrite=True)


@app.command("eval")
def eval_cmd(
    target: Path = typer.Argument(..., help="a run dir (its newest checkpoint) or a checkpoint dir"),
    overrides: list[str] = typer.Argument(
        None, help="overrides of the run's config, e.g. data.val=DIR or env.eval_episodes=50"
    ),
) -> None:
    """Score a checkpoint on the val shards of its run (config.yaml beside it), without DeepSpeed; for
    an RL run (env.id), env.eval_episodes episodes of its deterministic policy, episode e seeded by its
    index as in the run's own evaluation: a line "return MEAN +- STD over N episodes", then the JSON."""
    from pipeline import api

    try:
        metrics = api.evaluate(target, overrides or [])
    except ConfigError as e:
        _fail(str(e))
    if "eval/return" in metrics:
        typer.echo(
            f"return {metrics['eval/return']:.2f} +- {metrics['eval/return_std']:.2f} over "
            f"{int(metrics['eval/episodes'])} episodes (deterministic policy)"
        )
    typer.echo(json.dumps(metrics))


@app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="a checkpoint dir (step_XXXXXXXX) or a run dir (newest)"),
    out: Path = typer.Option(
        ...,
        "--out",
        help="output file: a torch state_dict (+ FILE.json metadata; + FILE.policy.pt2 for an RL run)",
    ),
    engine: str = typer.Option("model", "--engine", help="which engine of the checkpoint"),
) -> None:
    """Write consolidated fp32 weights that load into the plain nn.Module without DeepSpeed. For an RL
    run (env.id) also FILE.policy.pt2: the deterministic policy (observations -> actions) as a
    torch.export program that needs only torch: torch.export.load(FILE.policy.pt2).module()(obs)."""
    from pipeline import api

    try:
        meta = api.export(checkpoint, out, engine)
    except ConfigError as e:
        _fail(str(e))
    typer.echo(f"exported {meta['checkpoint']} (step {meta['step']}) -> {out}")
    if meta.get("policy", {}).get("file"):
        typer.echo(f"policy: {out.with_name(meta['policy']['file'])} ({meta['policy']['load']})")
    typer.echo(json.dumps(meta["model"]))


@app.command("generate")
def generate_cmd(
    target: Path = typer.Argument(
        ..., help="a language model's run dir (its newest checkpoint) or checkpoint"
    ),
    prompt: str = typer.Option(
        ..., "--prompt", help="the text to continue (characters of the training text)"
    ),
    tokens: int = typer.Option(200, "--tokens", help="how many tokens (characters, or bytes) to generate"),
    temperature: float = typer.Option(
        None, "--temperature", help="softmax temperature, 0: always the likeliest (default: the run's)"
    ),
    top_k: int = typer.Option(
        None, "--top-k", help="sample among the k likeliest, 0: all (default: the run's)"
    ),
    seed: int = typer.Option(0, "--seed", help="the sampling seed: the same seed gives the same text"),
) -> None:
    """Print the prompt and its generated continuation from a language model's checkpoint
    (task.name=language_model), in one process without DeepSpeed (fp32): no shards needed, the
    checkpoint holds the vocabulary. Deterministic for a given checkpoint, arguments and --seed."""
    from pipeline import api

    try:
        result = api.generate(target, prompt, tokens=tokens, temperature=temperature, top_k=top_k, seed=seed)
    except ConfigError as e:
        _fail(str(e))
    typer.echo(result["prompt"] + result["continuation"])


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(
        ..., help="a run dir of `pipeline train` (with metrics.jsonl), or a sweep dir of `pipeline sweep`"
    ),
    out: Path = typer.Option(None, "--out", help="the PNG to write (default: RUN_DIR/report.png)"),
) -> None:
    """Plot a run's loss, eval, throughput and LR curves to a PNG (from metrics.jsonl, no W&B needed)
    and print a one-screen summary: steps, final and best metrics, restarts and resumes, checkpoints.
    A sweep dir: the sweep's metric of every trial in one plot, the trials ranked, best.yaml."""
    from pipeline import report

    if (run_dir / "sweep.json").is_file():  # a sweep's dir: its trials' metric in one plot
        text, png = report.sweep_report(run_dir, out or run_dir / "report.png")
        typer.echo(text)
        typer.echo(f"curves: {png}")
        return
    try:
        rows, events, config = report.load(run_dir)
    except ConfigError as e:
        _fail(str(e))
    png = report.plot(rows, f"{config.get('name', run_dir.name)}: {run_dir}", out or run_dir / "report.png")
    typer.echo(report.summary(run_dir, rows, events, config))
    typer.echo(f"curves: {png}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
