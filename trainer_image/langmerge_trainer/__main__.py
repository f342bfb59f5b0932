"""``langmerge-trainer``: the command a training, evaluation or merge Job runs.

Verbs::

    train --task <json or @file>        train and commit one expert's adapter (a langmerge.tasks.TrainTask)
    distributed [torchrun options] train --task ...
                                        the same with several processes (DDP/FSDP2): torchrun's launcher (its
                                        options and PET_* variables), keeping the exit statuses below
    evaluate --base-model ... --dataset ... --output ...   metrics of a model on a language's eval split
    merge --task <json or @file>        the merge Job (langmerge_trainer.merge.job)
    merge-local ...                     merge adapters on this machine (langmerge_trainer.merge.cli)
    sample --base-uri ... --data-uri ...  build and upload the sample base model and datasets (langmerge up)
    bench [--quick] ...                 experts + merging vs one jointly trained model: quality and cost (results/)
    try --task <json or @file>          outputs of a merged model, the base and the experts (langmerge try)
    serve --model-name NAME --storage-uri URI --http-port P --grpc-port G [--host IP] [--device cpu]
                                        serve a published revision (s3:// or a local copy such as /mnt/models)
                                        over KServe's v1/v2 protocols (default host 127.0.0.1)
                                        (langmerge_trainer.serve); 1 or 4 with a one-line reason when it cannot load

Exit status (``langmerge.constants``; a Job's podFailurePolicy fails the Job at once on 2 and 4):

    0  done (or nothing to do)
    1  failed in a way another attempt may not (S3 or the node had a problem, the trained adapter collapsed); a failure
       record was written where the verb has one
    2  usage error: the command line or the task document is invalid
    3  preempted: a checkpoint was saved and a new attempt resumes from it
    4  an error no retry can fix (bad data, bad spec, inputs that changed); a non-retryable failure record was written

Why an attempt failed also goes to the container's termination message (``langmerge_trainer.failures``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from langmerge.constants import EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE, EXIT_USER_ERROR

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_PREEMPTED", "EXIT_USAGE", "EXIT_USER_ERROR", "main"]

VERBS = ("train", "distributed", "evaluate", "merge", "merge-local", "sample", "bench", "try", "serve")
USAGE = f"usage: langmerge-trainer {{{','.join(VERBS)}}} [options]  (langmerge-trainer <verb> --help)"

log = logging.getLogger("langmerge_trainer")


def setup_logging() -> None:
    """Timestamped lines on stderr; the level from ``LANGMERGE_LOG_LEVEL`` (default INFO). A training process of
    several (torchrun's ``RANK``/``WORLD_SIZE``) says its rank on each line."""
    level = os.environ.get("LANGMERGE_LOG_LEVEL", "INFO").upper()
    rank = f"[rank{os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format=f"%(asctime)s {rank}%(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S%z",
        stream=sys.stderr,
    )


def train_main(argv: Sequence[str]) -> int:
    from pydantic import ValidationError

    from langmerge.store import ObjectStore
    from langmerge.tasks import TrainTask
    from langmerge_trainer.data import read_json_arg
    from langmerge_trainer.failures import write_termination_message

    parser = argparse.ArgumentParser(prog="langmerge-trainer train", description="Train one expert's LoRA adapter.")
    parser.add_argument("--task", required=True, help="the TrainTask as JSON, or @path to a file holding it")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(list(argv))
    try:
        task = TrainTask.model_validate(read_json_arg(args.task))
    except (ValueError, OSError, ValidationError) as err:
        # No task, no output prefix: nothing to record a failure under.
        parser.print_usage(sys.stderr)
        log.error("--task is not a valid TrainTask: %s", err)
        write_termination_message(f"--task is not a valid TrainTask: {err}\n")
        return EXIT_USAGE
    from langmerge_trainer.train import Preempted, is_retryable, run_train_task

    store = ObjectStore.from_config()
    try:
        manifest = run_train_task(task, store, device=args.device)
    except Preempted as err:
        log.warning("%s", err)
        return EXIT_PREEMPTED
    except Exception as err:
        log.exception("training failed")
        return EXIT_FAILED if is_retryable(err) else EXIT_USER_ERROR
    log.info("adapter %s at %s", manifest.adapter_digest, manifest.adapter_uri)
    return EXIT_OK


def distributed_main(argv: Sequence[str]) -> int:
    from langmerge_trainer.distributed import launch_main

    return launch_main(argv)


def evaluate_main(argv: Sequence[str]) -> int:
    from langmerge_trainer.evaluate import cli_main

    try:
        return int(cli_main(argv))
    except Exception:
        log.exception("evaluation failed")
        return EXIT_FAILED


def merge_main(argv: Sequence[str]) -> int:
    from langmerge_trainer.merge.job import main as job_main

    return int(job_main(list(argv)) or 0)


def merge_local_main(argv: Sequence[str]) -> int:
    from langmerge_trainer.merge.cli import main as cli_main

    return int(cli_main(list(argv)) or 0)


def sample_main(argv: Sequence[str]) -> int:
    from langmerge_trainer.sample import seed_main

    return int(seed_main(list(argv)) or 0)


def bench_main(argv: Sequence[str]) -> int:
    from langmerge_trainer.bench.cli import main as cli_main

    return int(cli_main(list(argv)) or 0)


def try_main(argv: Sequence[str]) -> int:
    from langmerge_trainer.tryout import main as tryout_main

    return int(tryout_main(list(argv)))


def serve_main(argv: Sequence[str]) -> int:
    from langmerge_trainer.serve import main as serve

    return int(serve(list(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not args else sys.stdout)
        print(__doc__, file=sys.stderr if not args else sys.stdout)
        return EXIT_USAGE if not args else EXIT_OK
    verb, rest = args[0], args[1:]
    setup_logging()
    handlers = {
        "train": train_main,
        "distributed": distributed_main,
        "evaluate": evaluate_main,
        "merge": merge_main,
        "merge-local": merge_local_main,
        "sample": sample_main,
        "bench": bench_main,
        "try": try_main,
        "serve": serve_main,
    }
    handler = handlers.get(verb)
    if handler is None:
        print(f"unknown verb {verb!r}\n{USAGE}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return handler(rest)
    except SystemExit as exc:  # argparse: --help is 0, a usage error is 2
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except Exception:  # e.g. a verb whose module is missing from this image
        log.exception("langmerge-trainer %s failed", verb)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
