"""Command line: ``mpdistil-fast distill --config FILE [--set key=value [key=value ...]] [--data-dir DIR]
[--output-dir DIR] [--resume | --overwrite] [--quiet]``, ``mpdistil-fast evaluate --checkpoint DIR [--data-dir DIR]``
and ``mpdistil-fast env [--device cpu|cuda]`` (what can run here).

Several processes (``runtime.kind: deepspeed``): ``torchrun --nproc_per_node=N -m mpdistil_fast.cli distill ...``
or ``deepspeed --num_gpus N --module mpdistil_fast.cli distill ...``; ranks other than 0 log warnings only, and
an error that every rank raises alike (a config error, a diverged loss, Ctrl-C, a bad flag) is printed by the first
rank of each node only.  On several nodes (README, "Several nodes"): a rank that fails before its runtime starts (a
data folder missing on its node only) tells the other ranks, which stop too (exit status 2), and a rank that loses
another one in a collective (killed, failed alone) prints one line (exit status 1).

The config is validated (unknown keys, types, values, data files) before any model is loaded; a problem exits with
status 2 and one line naming the key.  So does a new run into an output_dir that holds an earlier run's outputs
(``--resume`` continues that run, ``--overwrite`` replaces it).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from datetime import timedelta
from pathlib import Path

from mpdistil_fast.distributed.runtime import RanksFailedToStartError
from mpdistil_fast.hub import HubUnavailableError
from mpdistil_fast.pipeline.checkpoint import DamagedCheckpointError
from mpdistil_fast.pipeline.config import ConfigError
from mpdistil_fast.pipeline.metrics_log import TrainingDivergedError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpdistil-fast", description=__doc__.split("\n\n")[0].replace("``", ""))
    # the deepspeed launcher puts --local_rank=N before the command (torchrun sets LOCAL_RANK, which the runtime reads)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    distill = commands.add_parser("distill", help="run a distillation method end to end")
    distill.add_argument("--config", required=True, help="YAML config file (see configs/)")
    distill.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                         help="override config keys, e.g. --set curriculum.reward=real data.batch_size=16 "
                              "(repeatable)")
    distill.add_argument("--data-dir", help="folder of the official SuperGLUE/GLUE files (= data.data_dir)")
    distill.add_argument("--output-dir", help="where outputs and checkpoints go (= output_dir)")
    earlier = distill.add_mutually_exclusive_group()
    earlier.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    earlier.add_argument("--overwrite", action="store_true",
                         help="delete an earlier run's checkpoints, metrics and report in output_dir first (a new "
                              "run refuses to mix its outputs with them otherwise)")
    distill.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    evaluate = commands.add_parser("evaluate", help="evaluate a checkpoint on the validation split")
    evaluate.add_argument("--checkpoint", required=True,
                          help="a checkpoint folder, or a run's output_dir (its newest checkpoint)")
    evaluate.add_argument("--data-dir", help="folder of the official data files (default: the checkpoint's)")
    env = commands.add_parser("env", help="torch, the machine, the kernel builds and which backend of each fused "
                                          "op can run here (and why not)")
    env.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    return parser


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:  # transformers' own warnings (e.g. newly initialised heads) are expected here
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def distill(args: argparse.Namespace) -> int:
    """``mpdistil-fast distill``: load and check the config (with ``--set`` and the flags as overrides), run every
    stage of its method, print the report; returns the exit status (0, or 1 when no task was reported)."""
    from mpdistil_fast.pipeline.config import load_config, verbatim_override

    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(verbatim_override("data.data_dir", args.data_dir))
    if args.output_dir is not None:  # (an empty one is refused, not taken for "not given")
        overrides.append(verbatim_override("output_dir", args.output_dir))
    if args.quiet:
        overrides.append("runtime.progress=false")
    config = load_config(args.config, overrides)
    from mpdistil_fast.distributed.runtime import closed_after
    from mpdistil_fast.pipeline.trainer import Run, runtime_for

    global _runtime_reached
    _runtime_reached = True  # from here on the runtime tells the other ranks (its start agreement, its close)
    # closed also when the run fails (on every rank, or on this one alone)
    with closed_after(runtime_for(config)) as runtime:
        run = Run(config, resume=args.resume, overwrite=args.overwrite, runtime=runtime)
        report = run.run()
        if run.is_main:
            output_dir = Path(config.output_dir)
            table = output_dir / "report.md"
            if table.is_file():
                print(table.read_text())
            print(f"outputs in {output_dir}: report.json, report.md, curves.png, metrics.jsonl, checkpoints/")
    return 0 if report["tasks"] else 1


def evaluate(args: argparse.Namespace) -> int:
    """``mpdistil-fast evaluate``: score a checkpoint's models on the validation split of its run's data (or of
    ``--data-dir``) and print the table and each task's data source; returns 0."""
    from mpdistil_fast.pipeline.evaluation import evaluate_checkpoint
    from mpdistil_fast.pipeline.report import format_results_table

    report = evaluate_checkpoint(Path(args.checkpoint), data_dir=args.data_dir)
    unfinished = "" if report["finished"] else (
        f"; an unfinished run's checkpoint ({'in stage ' + report['stage'] if report['stage'] else 'between stages'}"
        f", stages done: {', '.join(report['completed']) or 'none'}): its student is not the run's final one")
    print(f"{report['checkpoint']} (validation split{unfinished}):\n{format_results_table(report)}")
    print("\n".join(f"data {task}: {source}" for task, source in report["data_source"].items()))
    return 0


def env(args: argparse.Namespace) -> int:
    """``mpdistil-fast env``: print torch, the machine, the kernel builds and which backend of each fused op can run
    on ``--device`` (and why the others cannot); returns 0, or 2 for ``--device cuda`` without a CUDA device."""
    import torch

    from mpdistil_fast.backends import environment_lines

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("mpdistil-fast: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    print("\n".join(environment_lines(device)))
    return 0


def _first_rank_of_node() -> bool:
    """Whether this process prints the errors that every rank of a launch raises alike: the first rank of each node
    (``LOCAL_RANK`` 0, set by torchrun and the deepspeed launcher), and a process started without a launcher.  Each
    node's first rank, not rank 0 alone: a node that lacks a file the others have still says so."""
    return os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0"


def _several_ranks() -> bool:
    return os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1")


#: whether ``distill`` reached its runtime in this process (see :func:`_tell_the_other_ranks`)
_runtime_reached = False


def _tell_the_other_ranks() -> None:
    """This rank of a ``distill`` launch failed before it reached its runtime (a config error, a data folder missing
    on its node only, a bad flag): the other ranks are told through their runtime's start agreement
    (:func:`~mpdistil_fast.distributed.deepspeed_runtime.report_failed_start`), so they stop at once instead of
    waiting for this one until the collective timeout (on several nodes no launcher stops the other nodes' ranks).
    Waits for them at most the default ``runtime.collective_timeout_minutes``; best effort."""
    if not _several_ranks() or _runtime_reached:
        return
    try:
        from mpdistil_fast.distributed.deepspeed_runtime import report_failed_start
        from mpdistil_fast.pipeline.config import RuntimeConfig

        report_failed_start(timedelta(minutes=RuntimeConfig.collective_timeout_minutes))
    except Exception as error:  # (no DeepSpeed, the others gone): this rank's own error is the one that counts
        logging.getLogger(__name__).debug("could not tell the other ranks that this one failed: %s", error)


def _lost_a_rank(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another rank stopped (killed, or failed alone and
    left the process group) or stopped answering (the collective timeout): torch.distributed's errors, and gloo's
    transport errors (a ``RuntimeError`` naming gloo's source file)."""
    import torch.distributed

    return isinstance(error, torch.distributed.DistError) or (
        isinstance(error, RuntimeError) and "/gloo/transport/" in str(error))


def _first_sentence(error: BaseException) -> str:
    """``error``'s first line without a leading ``[source.cc:123]``, up to its first full stop."""
    line = re.sub(r"^\[[^\]]*\]\s*", "", (str(error).strip().splitlines() or [""])[0])
    return line.split(". ")[0].rstrip(".") or type(error).__name__


def _error(message: str, *, alike: bool) -> None:
    """Print ``mpdistil-fast: message`` on stderr.  ``alike``: every rank raises this error alike (it comes from the
    files every rank reads, or from a decision the ranks share), so only the first rank of each node prints it;
    otherwise each rank prints it, naming itself when there are several (a file one rank could not read)."""
    if alike and not _first_rank_of_node():
        return
    rank = f"rank {os.environ.get('RANK', '?')}: " if not alike and _several_ranks() else ""
    print(f"mpdistil-fast: {rank}{message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """The ``mpdistil-fast`` entry point: parse ``argv`` (default: ``sys.argv[1:]``), run the command and return its
    exit status; known errors print one line (config, data, hub or checkpoint problems: 2; a diverged loss: 1;
    Ctrl-C: 130; on several ranks, other ranks that could not start: 2, another rank lost in a collective: 1)
    instead of a traceback."""
    global _runtime_reached
    _runtime_reached = False
    parser = _parser()
    try:
        if _first_rank_of_node():
            args = parser.parse_args(argv)
        else:  # a bad flag is every rank's: its usage message is the first rank's to print
            with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull), \
                    contextlib.redirect_stdout(devnull):
                args = parser.parse_args(argv)
    except SystemExit as stop:  # a bad flag of distill: the other ranks are told too
        if stop.code and "distill" in (sys.argv[1:] if argv is None else argv):
            _tell_the_other_ranks()
        raise
    _setup_logging(getattr(args, "quiet", False) or os.environ.get("RANK", "0") != "0")
    try:
        try:
            return {"distill": distill, "evaluate": evaluate, "env": env}[args.command](args)
        except Exception:
            if args.command == "distill":  # before its runtime: the other ranks would wait for this one
                _tell_the_other_ranks()
            raise
    except RanksFailedToStartError as exc:  # (every rank that started learns it alike)
        _error(str(exc), alike=True)
        return 2
    except ConfigError as exc:
        _error(f"config error: {exc}", alike=True)
        return 2
    except DamagedCheckpointError as exc:  # (every rank reads the checkpoint's shared files)
        _error(str(exc), alike=True)
        return 2
    except (FileNotFoundError, HubUnavailableError) as exc:  # (maybe this rank's own file, or its download)
        _error(str(exc), alike=False)
        return 2
    except TrainingDivergedError as exc:  # (its metrics are logged; no checkpoint holds the broken weights)
        _error(str(exc), alike=True)  # (decided on the losses averaged over the ranks)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line (the run's files are closed by then), not a traceback
        hint = ("; `distill ... --resume` continues the run from its newest checkpoint"
                if args.command == "distill" else "")
        _error(f"interrupted{hint}", alike=True)  # (Ctrl-C reaches every rank: the launcher passes it on)
        return 130
    except Exception as exc:
        if not (_several_ranks() and _lost_a_rank(exc)):
            raise
        # another rank was killed, failed alone (its node prints why) or hangs: each rank that was waiting for it
        # gets this error, so each node's first rank prints it (a traceback of the collective said no more)
        hint = ("; `distill ... --resume` continues the run from its newest checkpoint"
                if args.command == "distill" else "")
        _error(f"another rank stopped or stopped answering, so a collective failed ({_first_sentence(exc)}); "
               f"the other nodes' output says why{hint}", alike=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
