"""``python -m export --model RUN/model --output RUN/onnx [--uint8-input] [--fp16] [--int8 --calibration-data
'SHARDS/*.tar.gz' [--calibration-size 512] [--min-cosine 0.99]]``: ONNX encoders + preprocess.json,
parity-checked against eager PyTorch; the int8 encoder is checked against float32 on held-out images.

``python -m export --model RUN/model --format timm|torchvision|open_clip --output DIR``: a folder the plain
library loads for fine-tuning (its README.md gives the loading lines; see ``export/fine_tune.py``)."""
from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="export", description=__doc__)
    parser.add_argument("--model", required=True, help="RUN/model directory written by pretrain")
    parser.add_argument("--output", required=True, help="directory for the ONNX files (RUN/onnx) or the export")
    parser.add_argument("--format", default="onnx", choices=("onnx", "timm", "torchvision", "open_clip"),
                        help="onnx (default): serving encoders; timm / torchvision / open_clip: a folder that "
                             "library loads for fine-tuning, with the loading lines in its README.md")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's fixed opset)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="fp32: max abs diff of normalised embeddings")
    parser.add_argument("--uint8-input", action="store_true",
                        help="image graph takes uint8 [N, H, W, C] at the model's size and normalises itself")
    parser.add_argument("--fp16", action="store_true",
                        help="also write float16 variants (*.fp16.onnx) for GPUs; parity: min cosine >= 0.999")
    parser.add_argument("--int8", action="store_true",
                        help="also write image_encoder.int8.onnx: static int8 (QDQ, per-channel weights), "
                             "calibrated on --calibration-data")
    parser.add_argument("--calibration-data", default=None,
                        help="shards whose first --calibration-size images calibrate the int8 activation ranges; "
                             "the next --held-out-size images measure int8 against float32")
    parser.add_argument("--calibration-size", type=int, default=512, help="calibration images (default 512)")
    parser.add_argument("--held-out-size", type=int, default=256, help="held-out images for the check (default 256)")
    parser.add_argument("--calibration-method", default="auto", choices=("auto", "minmax", "entropy", "percentile"),
                        help="auto: minmax, entropy, percentile in turn; the first that meets --min-cosine is kept")
    parser.add_argument("--min-cosine", type=float, default=0.99,
                        help="int8: min cosine to float32 on held-out images, else the export is refused (0.99)")
    args = parser.parse_args(argv)
    if args.format != "onnx":
        return _fine_tune(parser, args)

    from export.onnx import OPSET, ParityError, export_model
    from export.quantize import CalibrationError

    try:
        report = export_model(args.model, args.output, opset=args.opset or OPSET, tolerance=args.tolerance,
                              uint8_input=args.uint8_input, fp16=args.fp16, int8=args.int8,
                              calibration_data=args.calibration_data, calibration_size=args.calibration_size,
                              calibration_method=args.calibration_method, min_cosine=args.min_cosine,
                              held_out_size=args.held_out_size)
    except (FileNotFoundError, ValueError) as error:
        print(f"export failed: {error}", file=sys.stderr)
        return 2
    except ParityError as error:
        print(f"export failed parity: {error}", file=sys.stderr)
        return 2
    except CalibrationError as error:
        print(f"export refused: {error}", file=sys.stderr)
        return 2
    int8 = report.pop("image_int8", None)
    for tower, parity in report.items():
        what = f"{tower} graph" if tower.startswith("caption_") else f"{tower} encoder"  # CoCa's captioning graphs
        print(f"{what} parity vs eager (batch {parity['batch']}): max abs diff {parity['max_abs_diff']:.2e}, "
              f"min cosine {parity['min_cosine']:.7f}")
    if int8 is not None:
        held = int8["held_out"]
        print(f"image_int8 encoder vs float32 on {held['count']} held-out images ({int8['method']} calibration on "
              f"{int8['calibration']['count']} images): min cosine {held['min_cosine']:.5f}, mean {held['mean_cosine']:.5f}; "
              "serving on a CPU uses it by default (precision 'fp32' / --precision fp32 refuses it)")
        report["image_int8"] = int8
    print(json.dumps({"output": args.output, "parity": report}))
    return 0


def _fine_tune(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``--format timm|torchvision|open_clip``: the fine-tuning export (``export.fine_tune``)."""
    onnx_only = [flag for flag, used in (("--uint8-input", args.uint8_input), ("--fp16", args.fp16),
                                         ("--int8", args.int8), ("--calibration-data", args.calibration_data),
                                         ("--opset", args.opset is not None)) if used]
    if onnx_only:
        parser.error(f"only --format onnx takes {', '.join(onnx_only)} (got --format {args.format})")
    from export.fine_tune import ExportMismatch, UnsupportedExport, export_fine_tune

    try:
        report = export_fine_tune(args.model, args.output, args.format)
    except UnsupportedExport as error:
        print(f"export refused: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as error:
        print(f"export failed: {error}", file=sys.stderr)
        return 2
    except ExportMismatch as error:
        print(f"export failed parity: {error}", file=sys.stderr)
        return 2
    checks = ", ".join(f"{tower} min cosine {figures['min_cosine']:.6f}" for tower, figures in report.items()
                       if isinstance(figures, dict))
    print(f"{args.format} export in {report['output']} ({', '.join(report['files'])}); its README.md loading lines "
          f"vs the model ({report['feature']} features): {checks}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
