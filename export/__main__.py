"""``python -m export --model RUN/model --output RUN/onnx [--uint8-input] [--fp16]``: ONNX encoders +
preprocess.json, parity-checked against eager PyTorch."""
from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="export", description=__doc__)
    parser.add_argument("--model", required=True, help="RUN/model directory written by pretrain")
    parser.add_argument("--output", required=True, help="directory for the ONNX files (RUN/onnx)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's fixed opset)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="fp32: max abs diff of normalised embeddings")
    parser.add_argument("--uint8-input", action="store_true",
                        help="image graph takes uint8 [N, H, W, C] at the model's size and normalises itself")
    parser.add_argument("--fp16", action="store_true",
                        help="also write float16 variants (*.fp16.onnx) for GPUs; parity: min cosine >= 0.999")
    args = parser.parse_args(argv)

    from export.onnx import OPSET, ParityError, export_model

    try:
        report = export_model(args.model, args.output, opset=args.opset or OPSET, tolerance=args.tolerance,
                              uint8_input=args.uint8_input, fp16=args.fp16)
    except FileNotFoundError as error:
        print(f"export failed: {error}", file=sys.stderr)
        return 2
    except ParityError as error:
        print(f"export failed parity: {error}", file=sys.stderr)
        return 2
    for tower, parity in report.items():
        print(f"{tower} encoder parity vs eager (batch {parity['batch']}): max abs diff {parity['max_abs_diff']:.2e}, "
              f"min cosine {parity['min_cosine']:.7f}")
    print(json.dumps({"output": args.output, "parity": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
