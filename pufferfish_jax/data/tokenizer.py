"""The tokenizer: a byte-level BPE trained on (a sample of) the training split, or the user's tokenizer.json.

Byte-level BPE encodes any Unicode text losslessly with no unknown token, so decode(encode(text))
== text and bits-per-byte is well defined. Training on the train split only keeps the validation
text from leaking into the vocabulary. Trained tokenizers are cached by a fingerprint of what
determines them, because training costs seconds that a wall-clock budget pays for.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pufferfish_jax.data.files import Log, atomic_write, no_log
from pufferfish_jax.errors import DataError

EOS = "<|endoftext|>"
_EOS_NAMES = (EOS, "</s>", "<|end_of_text|>", "<eos>")  # what user tokenizers call it


def train_tokenizer(train_docs: Sequence[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with `<|endoftext|>` as id 0; deterministic for a given corpus and size.

    The 256 byte symbols are seeded as the initial alphabet so every byte is encodable even when
    the corpus never shows it.
    """
    if vocab_size < 257:
        raise DataError(f"vocab_size={vocab_size} is below the 256 byte symbols + 1 special token; "
                        "set data.vocab_size >= 257")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train_docs, trainer=trainer)
    return tok


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """Identifies a tokenizer by its full JSON serialization (vocab, merges, normalizers...)."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def eos_id(tok: Tokenizer) -> int:
    """Id of the end-of-text token that separates documents in the token stream."""
    for name in _EOS_NAMES:
        if (token_id := tok.token_to_id(name)) is not None:
            return token_id
    raise DataError(f"the tokenizer has no end-of-text token ({', '.join(_EOS_NAMES)}); "
                    "add one or leave data.tokenizer empty to train one")


def _read_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises bare Exception subclasses for missing/corrupt files
        raise DataError(f"cannot read tokenizer {path} ({type(e).__name__}); "
                        "give a Hugging Face tokenizer.json or set data.tokenizer='' to train one") from None


def load_or_train_tokenizer(train_docs: Sequence[str], vocab_size: int, cache_dir: Path, *,
                            path: str = "", corpus_fingerprint: str, log: Log = no_log) -> Tokenizer:
    """The tokenizer at `path` if given, else the cached or freshly trained BPE for this corpus.

    The cache key covers the training text (`corpus_fingerprint`), the size and the `tokenizers`
    version, since a new trainer may merge differently.
    """
    if path:
        tok = _read_tokenizer(Path(path).expanduser())
        eos_id(tok)
        log(f"tokenizer: {path} ({tok.get_vocab_size():,} tokens)")
        return tok
    key = json.dumps([corpus_fingerprint, vocab_size, tokenizers.__version__])
    cached = Path(cache_dir) / "tokenizers" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if cached.exists():
        log(f"tokenizer: cached {cached}")
        return _read_tokenizer(cached)
    log(f"tokenizer: training byte-level BPE, vocab {vocab_size:,}, on {len(train_docs):,} documents")
    tok = train_tokenizer(train_docs, vocab_size)
    with atomic_write(cached) as f:
        f.write(tok.to_str().encode())
    return tok
