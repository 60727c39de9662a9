"""The ``manyview`` console script: one entry point whose subcommands run the same code as the modules.

``manyview prepare|pretrain|evaluate|export|extract|index|serve [args]`` equals ``python -m trainer.prepare``,
``trainer/pretrain.py``, ``python -m trainer.evaluate``, ``python -m export``, ``python -m export.extract``,
``python -m index.build`` (``index-add``, ``index-evaluate``, ``index-merge``: ``index.add``, ``index.evaluate``,
``index.merge``) and
``python -m app`` (``caption-index``: ``python -m app.caption_index``). Subcommands import their module only when chosen, so ``serve`` never loads torch.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "prepare": ("trainer.prepare", "WebDataset shards from an image folder, IDX files or shards"),
    "pretrain": ("trainer.pretrain", "train an objective (use `accelerate launch trainer/pretrain.py` for several processes)"),
    "evaluate": ("trainer.evaluate", "kNN / linear / zero-shot accuracy of a saved model"),
    "export": ("export.__main__", "ONNX encoders + preprocess.json, parity-checked"),
    "extract": ("export.extract", "embeddings of a shard set through the ONNX encoder (resumable, multi-process)"),
    "index": ("index.build", "FAISS index of shards (through the ONNX encoder) or of extracted embeddings"),
    "index-add": ("index.add", "append embeddings to an index, or remove ids"),
    "index-evaluate": ("index.evaluate", "recall@1/10/100 against exact search and queries/s"),
    "index-merge": ("index.merge", "sharded builds: train a quantizer, add parts anywhere, merge"),
    "serve": ("app.__main__", "the Gradio app: search, map, diagnostics, compare"),
    "caption-index": ("app.caption_index", "index an image index's captions (the app's text index)"),
}

# Top-level packages of the `train` extra (pyproject.toml): a command that imports one needs that extra.
TRAIN_EXTRA = ("torch", "torchvision", "open_clip", "timm", "accelerate", "webdataset", "onnx", "onnxscript",
               "safetensors", "yaml")


def usage() -> str:
    lines = ["usage: manyview COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:14s} {text}" for name, (_, text) in COMMANDS.items()]
    lines.append("\n`manyview COMMAND --help` shows each command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"manyview: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[command][0])
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] in TRAIN_EXTRA:
            # The serving install (`pip install .`) has no torch; training and export need the `train` extra.
            print(f"manyview {command}: needs {error.name}, which the serving install leaves out; install the "
                  f"training extra: pip install 'manyview[train]' (from a checkout: pip install -e '.[train]')",
                  file=sys.stderr)
            return 2
        raise
    sys.argv = [f"manyview {command}", *rest]
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
