"""Export a training checkpoint as shareable weights, and optionally push them to the Hub.

    python export_ear.py --resume ${OUTPUT_DIR} --out ear-base-export
    python export_ear.py --resume ${OUTPUT_DIR} --out ear-base-export --push_to_hub user/ear-base

Writes `model.safetensors` (the EMA weights; --no_ema: the raw ones), `config.json` (the
network's settings) and `README.md` (the model card the Hub shows: license, tags, the settings,
trained epochs, the evaluations recorded in the run's eval_results.jsonl, the commands to sample)
to --out; the same checkpoint gives the same bytes. `sample_ear.py --resume` and `main_ear.py
--evaluate --resume` take that folder or the Hub repo id; loading it never unpickles. The Hub token
comes from the usual environment (HF_TOKEN, or `hf auth login`).
"""
import argparse

from util import pretrained
from util.errors import one_line_errors
from util.fileio import check_writable


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", required=True, help="folder holding checkpoint-last.pth")
    p.add_argument("--out", required=True,
                   help="folder to write model.safetensors, config.json and README.md to")
    p.add_argument("--no_ema", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--push_to_hub", default="", metavar="REPO_ID", help="also upload to this Hub repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--license", default=pretrained.DEFAULT_LICENSE,
                   help="the model card's license, a Hub identifier (mit, apache-2.0, "
                        f"cc-by-nc-4.0, ...; default {pretrained.DEFAULT_LICENSE}: none claimed)")
    args = p.parse_args(argv)
    with one_line_errors():
        check_writable(args.out, "--out", folder=True)
        out = pretrained.export(args.resume, args.out, use_ema=not args.no_ema,
                                license=args.license, repo_id=args.push_to_hub or None)
    print(f"wrote {out / pretrained.WEIGHTS}, {out / pretrained.CONFIG} and {out / pretrained.CARD}")
    if args.push_to_hub:
        print(f"pushed to {pretrained.push(out, args.push_to_hub, args.private)}")


if __name__ == "__main__":
    main()
