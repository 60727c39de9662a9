"""The text tower for image-text objectives: open_clip's causal TextTransformer, randomly initialised."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

CLIP_VOCAB_SIZE = 49408  # open_clip's bundled byte-level BPE


@dataclass
class TextConfig:
    context_length: int = 32
    vocab_size: int = CLIP_VOCAB_SIZE
    width: int = 256
    heads: int = 4
    layers: int = 4

    def to_dict(self) -> dict:
        return asdict(self)


def build_text_tower(config: TextConfig, output_dim: int) -> nn.Module:
    """A transformer [N, L] int64 tokens -> [N, output_dim], pooled at the end-of-text token."""
    from open_clip.transformer import TextTransformer

    return TextTransformer(
        context_length=config.context_length,
        vocab_size=config.vocab_size,
        width=config.width,
        heads=config.heads,
        layers=config.layers,
        output_dim=output_dim,
    )


def build_tokenizer(context_length: int):
    """open_clip's bundled BPE tokenizer (no download): list[str] -> LongTensor [N, context_length]."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def bpe_vocab_path() -> str:
    """Path of open_clip's bundled BPE merges file, copied beside the exported text encoder."""
    from open_clip.tokenizer import default_bpe

    return default_bpe()
