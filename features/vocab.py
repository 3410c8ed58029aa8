"""Word-level tokenizer and the vocabulary fitted on training notes.

Deliberately simple: lowercase, regex words and numbers, the most frequent ``max_size``
words of the training split, ``PAD`` = 0 and ``UNK`` = 1. The fitted word list is saved in
the dataset's ``meta.json`` and its fingerprint is part of the online store's key prefix,
because stored token ids mean nothing under a different vocabulary.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable

from features.definitions import PAD, UNK, VOCAB_SIZE

WORD = re.compile(r"[a-z]+|\d+(?:\.\d+)?")
SPECIALS = ("<pad>", "<unk>")


def tokenize(text: str) -> list[str]:
    return WORD.findall(text.lower())


class Vocabulary:
    def __init__(self, words: Iterable[str]):
        words = tuple(words)
        if words[:2] != SPECIALS:
            raise ValueError(f"a vocabulary starts with {SPECIALS}")
        # Token ids are stored as uint16 in the online state.
        if len(words) > 65_535:
            raise ValueError(f"vocabulary of {len(words)} words does not fit uint16 ids")
        self.words = words
        self._ids = {word: i for i, word in enumerate(words)}
        assert self._ids[SPECIALS[0]] == PAD and self._ids[SPECIALS[1]] == UNK

    @classmethod
    def fit(cls, texts: Iterable[str], max_size: int = VOCAB_SIZE, min_count: int = 1):
        counts = Counter(word for text in texts for word in tokenize(text))
        # Ties broken alphabetically so the same notes always give the same vocabulary.
        ranked = sorted(
            (w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w)
        )
        return cls(SPECIALS + tuple(ranked[: max_size - len(SPECIALS)]))

    def encode(self, text: str) -> list[int]:
        ids = self._ids
        return [ids.get(word, UNK) for word in tokenize(text)]

    def __len__(self) -> int:
        return len(self.words)

    @property
    def fingerprint(self) -> str:
        return hashlib.blake2b("\n".join(self.words).encode(), digest_size=4).hexdigest()
