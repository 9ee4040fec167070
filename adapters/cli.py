"""Subcommands of ``l2grader`` that make and judge adapters (an ``l2grader.commands`` entry point).

Heavy imports (torch, peft, vLLM) happen inside the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from serve.cli.common import engine_output, load_config_or_exit, parts_or_exit
from serve.cli.common import fail as _fail
from serve.cli.common import log as _log


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from adapters.tiny_model import make_tiny_model

    if args.parts < 1:
        _fail(f"--parts must be at least 1, not {args.parts}")
    out = make_tiny_model(args.dir, seed=args.seed, parts=args.parts)
    print(f"wrote tiny UNTRAINED Qwen2-Audio checkpoint to {out / 'model'}", file=sys.stderr)
    print(f"wrote demo adapters to {out / 'adapters'}", file=sys.stderr)
    print(f"wrote ready config {out / 'demo.yaml'}", file=sys.stderr)
    return 0


def cmd_synth_data(args: argparse.Namespace) -> int:
    from adapters.synth import SynthError, synth_dataset

    try:
        paths = synth_dataset(
            args.dir,
            n_train=args.n_train,
            n_dev=args.n_dev,
            n_test=args.n_test,
            seed=args.seed,
            part=args.part,
            degrade_share=args.degrade,
            bias_voice=args.bias_voice,
            bias=args.bias,
            aspects=args.aspects,
        )
    except SynthError as e:
        _fail(str(e), 1)
    for name, path in paths.items():
        n = sum(1 for _ in open(path))
        print(f"wrote {n} {name} answers to {path}", file=sys.stderr)
    return 0


def quiet_transformers() -> None:
    """transformers' and peft's notices: errors only; no "Loading weights" bar (the commands print their progress).
    Before transformers is imported: both are read at import."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config_or_exit(args.config, args.part)
    if not args.verbose:
        quiet_transformers()
    from adapters.dataset import DataError
    from adapters.train import TrainError, TrainOptions, format_summary, train

    opts = TrainOptions(
        part=args.part,
        data=args.data,
        out=args.out,
        dev=args.dev,
        loss=args.loss,
        epochs=args.epochs,
        lr=args.lr,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        batch_size=args.batch_size,
        warmup_ratio=args.warmup_ratio,
        eval_every=args.eval_every,
        save_every=args.save_every,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        resume=args.resume,
        stop_after=args.stop_after,
        progress=not args.no_progress,
        aspect=args.aspect,
    )
    untrained = "the tiny UNTRAINED demo checkpoint (random weights): the adapter and its dev scores mean nothing"
    if cfg.model.untrained:
        _log(f"WARNING: training on {untrained}")
    try:
        summary = train(cfg, opts)
    except (TrainError, DataError) as e:
        _fail(str(e), 1)
    print(format_summary(summary))
    if cfg.model.untrained:
        _log(f"WARNING: trained on {untrained}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if (args.data is None) == (args.session is None):
        _fail("give either --data (a test set to score) or --session (a session's output, with --human)", 2)
    if args.session is not None and args.human is None:
        _fail("--session needs --human: a CSV, JSON-lines or Parquet file of response_id and human score", 2)
    cfg = load_config_or_exit(args.config)
    (part,) = parts_or_exit(cfg, args.config, [args.part]).values()
    cfg = cfg.model_copy(update={"parts": {args.part: part.config}})  # the registry's version of the part
    from adapters.dataset import DataError
    from adapters.evaluate import evaluate, evaluate_session
    from serve.grading.adapter_files import AdapterError
    from serve.session.store import OutputError

    shared = {
        "plot": args.plot,
        "predictions": args.predictions,
        "group_by": [g.strip() for g in (args.group_by or "").split(",") if g.strip()],
        "report": args.report,
        "selective_signal": args.selective_signal,
    }
    try:
        if args.session is not None:
            evaluate_session(cfg, args.session, args.part, args.human, human_column=args.human_column, **shared)
        else:
            with engine_output("evaluate", args.verbose):
                evaluate(cfg, args.part, args.data, adapter=args.adapter, **shared)
    except (DataError, AdapterError, OutputError, ValueError) as e:
        _fail(str(e), 1)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    cfg = load_config_or_exit(args.config, args.part)
    from adapters.dataset import DataError
    from adapters.evaluate import calibrate
    from serve.grading.adapter_files import AdapterError

    try:
        with engine_output("calibrate", args.verbose):
            calibrate(cfg, args.part, args.data, adapter=args.adapter, allow_small=args.allow_small, report=args.report)
    except (DataError, AdapterError, ValueError, OSError) as e:
        _fail(str(e), 1)
    return 0


def cmd_calibrate_candidates(args: argparse.Namespace) -> int:
    cfg = load_config_or_exit(args.config)
    parts = parts_or_exit(cfg, args.config)  # as served: the parts added with PUT /v1/parts too
    from adapters.candidate_calibrate import calibrate_candidates

    try:
        calibrate_candidates(
            cfg,
            parts,
            args.human,
            session=args.session,
            candidates_file=args.candidates,
            id_column=args.id_column,
            human_column=args.human_column,
            out=args.out,
            allow_small=args.allow_small,
            report=args.report,
        )
    except (ValueError, OSError) as e:
        _fail(str(e), 1)
    return 0


def _adapter_args(values: list[str] | None) -> dict[str, str]:
    """``--adapter P1=DIR`` flags as {part: folder}."""
    from adapters.sandi import PARTS

    out = {}
    for v in values or []:
        part, sep, path = v.partition("=")
        if not sep or part not in PARTS or not path:
            _fail(f"--adapter {v!r}: expected PART=FOLDER with PART one of {', '.join(PARTS)}", 2)
        out[part] = path
    return out


def cmd_sandi(args: argparse.Namespace) -> int:
    from adapters import sandi
    from adapters.dataset import DataError

    if args.sandi_command == "prepare":
        try:
            summary = sandi.prepare(args.release, args.out, held_out=args.held_out, seed=args.seed)
        except (DataError, OSError) as e:
            _fail(str(e), 1)
        for split in (*sandi.SPLITS, sandi.CALIBRATION_SPLIT):
            for part in sandi.PARTS:
                n = summary[split][part]
                print(
                    f"{sandi.data_file(args.out, split, part)}: {n['responses']} responses of {n['submissions']} "
                    "submissions"
                    + (f" ({n['unmarked_responses']} unmarked, left out)" if n.get("unmarked_responses") else ""),
                    file=sys.stderr,
                )
        print(json.dumps(summary), flush=True)
        return 0
    if args.sandi_command == "score":
        try:
            sandi.report(sandi.score_files(args.predictions, args.prepared, args.split), args.split)
        except (DataError, OSError) as e:
            _fail(str(e), 1)
        return 0
    cfg = load_config_or_exit(args.config)
    missing = [p for p in sandi.PARTS if p not in cfg.parts]
    if missing:
        _fail(f"{args.config}: the recipe needs parts {', '.join(sandi.PARTS)}; missing {', '.join(missing)}", 2)
    if not args.verbose:
        quiet_transformers()
    from adapters.train import TrainError
    from serve.grading.adapter_files import AdapterError

    try:
        with engine_output(f"sandi-{args.sandi_command}", args.verbose):
            return _sandi_engine_command(args, cfg, sandi)
    except (DataError, AdapterError, TrainError, ValueError, OSError) as e:
        _fail(str(e), 1)


def _sandi_engine_command(args: argparse.Namespace, cfg, sandi) -> int:
    """``sandi predict`` or ``sandi run``: the recipe's steps that start the engine."""
    if args.sandi_command == "predict":
        sandi.predict(cfg, args.prepared, args.out, split=args.split, adapters=_adapter_args(args.adapter))
        return 0
    options = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "progress": False}
    sandi.run(
        cfg,
        args.release,
        args.out,
        train_options=options,
        calibrate=not args.no_calibrate,
        allow_small=args.allow_small,
        held_out=args.held_out,
        seed=args.seed,
    )
    return 0


def add_sandi(sub: argparse._SubParsersAction) -> None:
    """``l2grader sandi prepare|predict|score|run``: the Speak & Improve 2025 recipe (docs/speak-and-improve.md)."""
    p = sub.add_parser("sandi", help="Speak & Improve Corpus 2025: prepare, predict, score in its format, run it all")
    sp = p.add_subparsers(dest="sandi_command", required=True, metavar="{prepare,predict,score,run}")
    p.set_defaults(func=cmd_sandi)

    def held_out_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--held-out",
            type=float,
            default=0.1,
            help="share of train's submissions kept out of training to calibrate on (default 0.1)",
        )
        q.add_argument("--seed", type=int, default=0, help="draw of the held-out submissions (default 0)")

    q = sp.add_parser("prepare", help="read the release (file lists, marks) into JSON-lines answers per split and part")
    q.add_argument("release", help="the release root (holding reference-materials/)")
    q.add_argument("out", help="output folder: {train,calib,dev}.{P1,P3,P4,P5}.jsonl, marks/, prepare.json")
    held_out_flags(q)

    q = sp.add_parser("predict", help="score a prepared split and write the challenge's prediction files and table")
    q.add_argument("--config", required=True, help="grader config with parts P1, P3, P4, P5")
    q.add_argument("--prepared", required=True, help="the folder `sandi prepare` wrote")
    q.add_argument("--out", required=True, help="folder for {split}-{P1,P3,P4,P5,overall}.tsv")
    q.add_argument(
        "--split", default="dev", help="prepared split to score: dev (default) or calib, the held-out train submissions"
    )
    q.add_argument(
        "--adapter",
        action="append",
        metavar="PART=DIR",
        help="a part's adapter instead of the configured one (repeatable)",
    )
    q.add_argument("--verbose", action="store_true", help="show the engine's own log")

    q = sp.add_parser("score", help="the challenge's table of existing prediction files (no model)")
    q.add_argument("--prepared", required=True, help="the folder `sandi prepare` wrote (its marks/)")
    q.add_argument("--predictions", required=True, help="folder of {split}-{part}.tsv prediction files")
    q.add_argument("--split", default="dev", help="split (default dev)")

    q = sp.add_parser("run", help="prepare, train each part, calibrate each on held-out train, predict dev")
    q.add_argument("--config", required=True, help="grader config with parts P1, P3, P4, P5")
    q.add_argument("release", help="the release root (holding reference-materials/)")
    q.add_argument("out", help="output folder: data/, adapters/PART/, predictions/")
    held_out_flags(q)
    q.add_argument("--epochs", type=float, default=2.0, help="passes over each part's data (default 2)")
    q.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    q.add_argument("--batch-size", type=int, default=8, help="chunks per optimizer step (default 8)")
    q.add_argument("--no-calibrate", action="store_true", help="skip the calibration of the adapters")
    q.add_argument("--allow-small", action="store_true", help="calibrate on fewer answers than coverage needs")
    q.add_argument("--verbose", action="store_true", help="show the engine's and transformers' own notices")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the adapter subcommands (make-tiny-model, train, evaluate, calibrate, calibrate-candidates, synth-data,
    sandi) to the parser."""
    p = sub.add_parser(
        "make-tiny-model", help="write a tiny random Qwen2-Audio checkpoint, demo adapters and demo.yaml"
    )
    p.add_argument("dir", help="output folder")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--parts",
        type=int,
        default=2,
        help="demo parts, each with its own adapter: interview, long_turn, then part_3, part_4, ... (default 2)",
    )
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser(
        "train", help="train a part's LoRA adapter (holistic score and the part's aspects) on scored answers"
    )
    p.add_argument("--verbose", action="store_true", help="print transformers' own notices too")
    p.add_argument("--config", required=True, help="grader YAML config (base model, part prompt and levels)")
    p.add_argument("--part", required=True, help="exam part to train the adapter for")
    p.add_argument(
        "--aspect",
        help="train an adapter of its own for this aspect of the part, on the answers with its score (then name it "
        "in the config: aspects: {ASPECT: {adapter: OUT}}); default: one adapter for the holistic score and every "
        "aspect without an adapter of its own",
    )
    p.add_argument(
        "--data",
        required=True,
        help='training answers: JSON lines {"audio": path, "score": number, "aspects": {aspect: number} (optional)}',
    )
    p.add_argument("--out", required=True, help="adapter output folder (checkpoints go to OUT/checkpoints)")
    p.add_argument("--dev", help="development answers, evaluated periodically and at the end")
    p.add_argument(
        "--loss",
        choices=["fa", "ce"],
        default="fa",
        help="fa: fair-average soft targets (default); ce: cross-entropy on the rounded score",
    )
    p.add_argument("--epochs", type=float, default=2.0, help="passes over the data (default 2)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, cosine schedule (default 1e-4)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    p.add_argument("--batch-size", type=int, default=8, help="chunks per optimizer step (default 8)")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="share of steps of linear warm-up (default 0.03)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between dev evaluations (default: each epoch)")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (default: each epoch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        help="base model weights (default: bfloat16 on cuda, float32 on cpu)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")
    p.add_argument(
        "--stop-after",
        type=int,
        default=0,
        metavar="N",
        help="stop after N steps of this invocation, checkpointed (for time-boxed jobs; then --resume)",
    )
    p.add_argument("--no-progress", action="store_true", help="progress lines instead of a progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate", help="score a test set through vLLM; agreement, selective scoring, fairness, plot and report"
    )
    p.add_argument("--config", required=True, help="grader YAML config")
    p.add_argument("--part", required=True, help="exam part of the test set")
    p.add_argument("--data", help='test answers to score: JSON lines {"audio": path, "score": number}')
    p.add_argument("--session", metavar="OUT", help="a session's output folder (score-session --out): no scoring")
    p.add_argument(
        "--human", metavar="FILE", help="with --session: human scores, CSV/JSON lines/Parquet with response_id"
    )
    p.add_argument("--human-column", default="score", help="the human score's column in --human (default score)")
    p.add_argument("--adapter", help="adapter folder to evaluate instead of the part's configured one")
    p.add_argument("--plot", help="calibration plot PNG (default: DATA.PART.calibration.png beside the data)")
    p.add_argument("--predictions", help="also write each answer's scores to this JSON-lines file")
    p.add_argument(
        "--group-by",
        metavar="FIELDS",
        help="comma-separated fields of the data to compare groups by (fairness table), e.g. l1,gender",
    )
    p.add_argument("--report", metavar="DIR", help="write DIR/report.html (self-contained) and DIR/report.json")
    p.add_argument(
        "--selective-signal",
        default="score_sd",
        help="signal whose selective-scoring list is the JSON's `selective` (default score_sd)",
    )
    p.add_argument("--verbose", action="store_true", help="show the engine's own log")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "calibrate",
        help="score held-out answers and store the part's score-interval calibration beside its adapter",
    )
    p.add_argument("--config", required=True, help="grader YAML config")
    p.add_argument("--part", required=True, help="exam part")
    p.add_argument(
        "--data",
        required=True,
        help='held-out answers (not the training set, not the test set): JSON lines {"audio": path, "score": number}',
    )
    p.add_argument("--adapter", help="adapter folder to calibrate instead of the part's configured one")
    p.add_argument(
        "--allow-small",
        action="store_true",
        help="calibrate on fewer answers than the part's coverage needs (the calibration records n and the range "
        "of coverage it may realise)",
    )
    p.add_argument("--report", metavar="DIR", help="also write the per-bin coverage table to DIR/calibration.json")
    p.add_argument("--verbose", action="store_true", help="show the engine's own log")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "calibrate-candidates",
        help="fit the overall interval on held-out candidates' human overall scores (candidate.calibration)",
    )
    p.add_argument("--config", required=True, help="grader YAML config (its candidate: rule and parts)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--session", metavar="OUT", help="a finished session's output folder (score-session --out)")
    src.add_argument(
        "--candidates",
        metavar="FILE",
        help="a table of candidates' machine overall scores by the config's rule: candidate_id, score "
        "(CSV, TSV, JSON lines or Parquet, e.g. a session's candidates.parquet)",
    )
    p.add_argument(
        "--human",
        required=True,
        metavar="FILE",
        help="held-out candidates' human overall scores: candidate_id, score (CSV, TSV, JSON lines or Parquet)",
    )
    p.add_argument("--id-column", default="candidate_id", help="the candidate id's column (default candidate_id)")
    p.add_argument("--human-column", default="score", help="the human score's column in --human (default score)")
    p.add_argument("--out", help="calibration file to write (default: the config's candidate.calibration.path)")
    p.add_argument(
        "--allow-small",
        action="store_true",
        help="calibrate on fewer candidates than the coverage needs (the calibration records n and the range of "
        "coverage it may realise)",
    )
    p.add_argument("--report", metavar="DIR", help="also write the per-bin coverage table to DIR")
    p.set_defaults(func=cmd_calibrate_candidates)

    p = sub.add_parser("synth-data", help="make a synthetic scored speaking test with espeak-ng (train/dev/test)")
    p.add_argument("dir", help="output folder")
    p.add_argument("--n-train", type=int, default=300, help="training answers (default 300)")
    p.add_argument("--n-dev", type=int, default=60, help="development answers (default 60)")
    p.add_argument("--n-test", type=int, default=100, help="test answers (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--part", default="interview", help="part id written into the data (default interview)")
    p.add_argument(
        "--degrade",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="share of dev and test answers degraded: noise at -5..5 dB SNR, clipping, long silent gaps "
        "or truncation (default 0)",
    )
    p.add_argument("--bias-voice", help="voice whose dev and test human scores get --bias added (a planted bias)")
    p.add_argument("--bias", type=float, default=0.0, help="shift of --bias-voice's human scores (default 0)")
    p.add_argument(
        "--aspects",
        action="store_true",
        help="draw fluency, pronunciation, language_use and coherence independently, each audible through its own "
        "property of the speech; the score is their mean",
    )
    p.set_defaults(func=cmd_synth_data)

    add_sandi(sub)
