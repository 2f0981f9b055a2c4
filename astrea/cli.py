"""The ``astrea`` command line (also ``python -m astrea``)."""

from __future__ import annotations

import argparse
import importlib.util
import sys


def _add_demo(sub) -> None:
    from astrea.train import config

    demo = sub.add_parser(
        "demo",
        help="train a small Astrea through every stage on generated scenes and write a run folder",
        description="Progressive pre-alignment (Caption, Classification, Detection, Segmentation) then "
                    "Instruct, on generated shape scenes; writes metrics per stage, figures and a "
                    "resumable safetensors checkpoint to --out.",
    )
    demo.add_argument("--out", required=True, help="run folder to write")
    demo.add_argument("--quick", action="store_true", help="a seconds-long run on a tiny configuration")
    demo.add_argument("--resume", metavar="CHECKPOINT", help="continue from a checkpoint.safetensors")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: reproducible numbers)")
    demo.add_argument("--experts", choices=("astrea", "transformers"), default="astrea",
                      help="astrea: the tiny built-in experts and decoder (default); transformers: small random "
                           "OWLv2/SegFormer/DINOv2/SigLIP experts and a Qwen2 LM (needs transformers); a resumed "
                           "run keeps the kind of its checkpoint")
    demo.add_argument("--data", metavar="FOLDER",
                      help="train on a folder of images with annotations.jsonl / annotations.json (records or "
                           "COCO-style) instead of the generated scenes; give it again with --resume")
    demo.add_argument("--annotations", metavar="FILE", help="the annotation file of --data, when not the default")
    config.add_arguments(demo)


def _demo(args: argparse.Namespace) -> None:
    from astrea import distributed
    from astrea.train import AlignConfig
    from astrea.train.config import overrides
    from astrea.train.demo import DEMO_EXTRAS, INSTALL_DEMO, require_demo_extras, run_demo, summary_lines

    try:
        require_demo_extras()
    except ImportError as exc:
        raise SystemExit(f"astrea demo: {exc}") from None
    if args.experts == "transformers" and importlib.util.find_spec("transformers") is None:
        raise SystemExit("astrea demo: --experts transformers needs transformers; install it with: "
                         "pip install transformers")
    given = overrides(args)
    if args.resume and given:
        raise SystemExit("astrea demo: --resume continues the saved configuration; drop "
                         + ", ".join("--" + k.replace("_", "-") for k in given))
    cfg = None if args.resume else (AlignConfig.quick(**given) if args.quick else AlignConfig(**given))
    distributed.init_from_env("cpu")  # under torchrun: one data-parallel rank of the CPU demo (gloo)
    try:
        final = run_demo(args.out, cfg, resume=args.resume, progress=not args.no_progress, threads=args.threads,
                         experts=args.experts, data=args.data, annotations=args.annotations)
    except ModuleNotFoundError as exc:  # an extra found above but broken on import
        top = (exc.name or "").partition(".")[0]
        if top not in DEMO_EXTRAS:
            raise
        raise SystemExit(f"astrea demo: {DEMO_EXTRAS[top]} (demo extra) cannot be imported ({exc}); "
                         f"install the extras with: {INSTALL_DEMO}") from None
    if distributed.is_main():
        print("\n".join(["final metrics:"] + ["  " + line for line in summary_lines(final)]))
        print(f"run folder: {args.out}")
    distributed.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="astrea", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, compiled extension, and the backend of every op")
    _add_demo(sub)
    args = parser.parse_args(argv)

    if args.command == "info":
        from astrea import info

        info.main()
    elif args.command == "demo":
        _demo(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
