"""x2edit pipeline CLI.

    python -m pipeline run --recipe default-cpu --run-dir runs/default            # fused, embedded Ray
    python -m pipeline run --recipe R --stage source --run-dir D                  # one stage (e.g. a Ray job)
    ray job submit --working-dir . -- python -m pipeline run --recipe R --stage edit --run-dir D
    python -m pipeline refilter --run-dir D --recipe R2 --out D2                  # R2's policy, no model re-run
    python -m pipeline refilter --run-dir D --recipe R2 --out D2 --no-pack        # decide now, pack later
    python -m pipeline run --recipe R --run-dir s3://bucket/runs/x                # a run dir in object storage

Stages: source, instruct, edit, score, pack; each per-stage job starts only once the previous stage has
finished. Rerunning on the same run dir resumes: committed work is skipped, uncommitted leftovers are
discarded. Ray: a fresh embedded cluster on 127.0.0.1 unless --address or RAY_ADDRESS names one to join.
"""
from __future__ import annotations

import argparse
import sys

from manifests.schema import STAGES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline (fused) or one stage")
    run.add_argument("--recipe", help="recipe YAML path or shipped recipe name (default: the one the run dir "
                                      "records, to resume a run or run its next stage)")
    run.add_argument("--run-dir", required=True, help="a folder (shared by every node of a cluster) or an object "
                                                      "store prefix, e.g. s3://bucket/runs/x (AWS_* from the env)")
    run.add_argument("--stage", choices=STAGES, help="run only this stage (default: all, fused)")
    run.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS if set, else a fresh embedded "
                                       "cluster on 127.0.0.1, whatever else runs on the machine)")
    refilter = sub.add_parser("refilter", help="a new corpus version of a finished run under another recipe's "
                                               "score policy, without running any model")
    refilter.add_argument("--run-dir", required=True, help="the finished run")
    refilter.add_argument("--recipe", required=True, help="recipe whose score rules to apply")
    refilter.add_argument("--out", required=True, help="new run dir for the re-filtered corpus")
    refilter.add_argument("--address", help="join this Ray cluster for packing (default: as for run)")
    refilter.add_argument("--no-pack", action="store_true", help="stop once the rows are re-decided and the diff "
                                                                "written; pack later with `run --stage pack`")
    args = parser.parse_args(argv)

    from pipeline.cluster import RunDirNotShared
    from pipeline.recipe import RecipeError
    from pipeline.run import run as run_pipeline
    from pipeline.stage_state import StageNotReady

    try:
        if args.command == "refilter":
            from pipeline.refilter import refilter as refilter_run

            refilter_run(args.run_dir, args.recipe, args.out, args.address, pack=not args.no_pack)
        else:
            run_pipeline(args.recipe, args.run_dir, args.stage, args.address)
    except (RecipeError, StageNotReady, RunDirNotShared) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
