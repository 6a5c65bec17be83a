"""The tiny families' character-level tokenizer: one token per character, saved as tokenizer.json.

It adds no special tokens when encoding (no BOS, no post-processor), so the torch-free serving
path (`tokenizers.Tokenizer.from_file(dir / "tokenizer.json").encode(prompt).ids`) and
`AutoTokenizer.from_pretrained(dir)(prompt).input_ids` give the same ids. The model learns
prompt -> answer + <eos>; <pad> pads batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIALS = (PAD, EOS, UNK)  # ids 0, 1, 2
CHARS = "0123456789abcdefghijklmnopqrstuvwxyz+-=:>| "
VOCAB = {tok: i for i, tok in enumerate([*SPECIALS, *CHARS])}
PAD_ID, EOS_ID = VOCAB[PAD], VOCAB[EOS]


def build_tokenizer() -> Any:
    """A `tokenizers.Tokenizer` that splits text into single characters (unknown ones -> <unk>)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    return tok


def save_tokenizer(folder: str | Path) -> None:
    """Write tokenizer.json plus the transformers side files that AutoTokenizer reads."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(), pad_token=PAD,
                                   eos_token=EOS, unk_token=UNK, padding_side="left")
    fast.save_pretrained(str(folder))


def encode(text: str) -> list[int]:
    """Ids without loading any file (same ids as the saved tokenizer; unknown chars -> <unk>)."""
    unk = VOCAB[UNK]
    return [VOCAB.get(ch, unk) for ch in text]
