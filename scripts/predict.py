"""Run one prediction in-process with the project's Predictor, as `cog predict` would, and print the files.

  python scripts/predict.py -i prompt="a lighthouse at dusk" -i mode=sd-turbo [-o outputs]
  python scripts/predict.py --tiny -i prompt=test     # offline smoke test on tiny random weights
"""

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--input", action="append", default=[], metavar="NAME=VALUE",
                        help="an input of Predictor.run (files: image=@path)")
    parser.add_argument("-o", "--output", default="outputs", help="folder for the image files (default: outputs)")
    parser.add_argument("--tiny", action="store_true",
                        help="use tiny random weights built on the spot: checks the whole path offline, in seconds; "
                             "the images are noise")
    args = parser.parse_args()
    raw = dict(item.split("=", 1) for item in args.input if "=" in item)
    bad = [item for item in args.input if "=" not in item]
    if bad:
        parser.error(f"-i takes NAME=VALUE, got: {', '.join(bad)}")

    # One prediction needs one mode: fetch and load only that one unless ENABLED_MODES says otherwise.
    from lib.modes import DEFAULT_MODE

    os.environ.setdefault("ENABLED_MODES", raw.get("mode", DEFAULT_MODE))
    if args.tiny:
        from scripts.make_tiny_weights import write_tiny_weights

        os.environ["WEIGHTS_OFFLINE"] = "1"  # use the folder as it is: no manifest, no download
        os.environ["WEIGHTS_DIR"] = tiny_dir = tempfile.mkdtemp(prefix="tiny-weights-")
        write_tiny_weights(Path(tiny_dir))

    from lib.local import collect, run_inputs
    from predict import Predictor

    predictor = Predictor()
    try:  # checked before setup: a typo should not wait for the weights
        inputs = run_inputs(predictor, raw)
    except ValueError as e:
        print(f"invalid input: {e}", file=sys.stderr)
        return 2
    try:
        predictor.setup()
    except Exception as e:  # setup's own message says what is missing and where
        print(f"setup failed: {e}\n\nThe weights come from the Hugging Face Hub (HF_TOKEN for gated repos) or from "
              "a mirror in WEIGHTS_BASE_URL (docs/weights.md); files already in WEIGHTS_DIR are used as they are "
              "with WEIGHTS_OFFLINE=1. To check the whole path offline on tiny random weights:\n"
              "  scripts/predict.sh --tiny -i prompt=\"a test\"", file=sys.stderr)
        return 1
    metrics = {}
    predictor.record_metric = lambda key, value, mode="replace": metrics.__setitem__(key, value)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    try:
        for path in collect(predictor, **inputs):
            target = out / Path(path).name
            shutil.move(path, target)
            print(target)
    except ValueError as e:
        print(f"prediction failed: {e}", file=sys.stderr)
        return 2
    print("metrics:", metrics, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
