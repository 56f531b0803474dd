"""OpenAI CLIP's byte-level BPE tokenizer, written from scratch, plus a BPE learner for small corpora.

CLIP (Radford et al. 2021, section 2.4) reads lower-cased text through a byte-pair encoding
(Sennrich et al. 2016) with a 49,408-token vocabulary, brackets it with [SOS] ... [EOS] and pads
it with zeros to 77 tokens; the text feature is read at [EOS]. FreeSeg feeds every class name and
every prompt through this tokenizer, so our ids must equal OpenAI's exactly: a test checks them
against OpenAI's `SimpleTokenizer` on thousands of strings.

How text becomes ids:
1. clean: ftfy repairs mojibake, HTML entities are unescaped (twice, for doubly escaped web text),
   runs of whitespace become one space, everything is lower-cased;
2. pre-tokenise: a regex cuts the text into words (explained at `PATTERN`);
3. each word's UTF-8 bytes are mapped to printable characters (`bytes_to_unicode`) and its last
   symbol gets the end-of-word marker `</w>`;
4. BPE: the adjacent pair with the best (lowest) merge rank is merged, everywhere in the word,
   until no pair of the word is a known merge; each resulting symbol is one vocabulary entry.

The vocabulary is always: 256 byte symbols, the same 256 with `</w>`, one symbol per merge (in
merge order), then `<|startoftext|>` and `<|endoftext|>`. With OpenAI's 48,894 merges that gives
512 + 48,894 + 2 = 49,408 ids; with merges learned by `learn_bpe` (the toy world's CLIP, which
needs no file from outside the repository) the same rule gives 514 + num_merges ids. Either way
the end-of-text id is the largest, which is why CLIP finds it with `argmax`.

Deliberate differences from OpenAI's `simple_tokenizer.py`: over-long text raises `ValueError`
(OpenAI: RuntimeError) naming the text; `tokenize` returns int64; the vocabulary file is searched
for (see `find_bpe_file`) instead of sitting next to the code; `learn_bpe` is new.
"""

import functools
import gzip
import html
import importlib.util
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import ftfy
import regex
import torch

from freeseg import weights

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# OpenAI keeps the first 49152 - 256 - 2 = 48,894 merges of the 262,145 in its file: 49,152
# (48 Ki) was the intended vocabulary size, less 256 byte symbols and 2 special tokens. The 256
# `</w>` byte variants were not budgeted, so the real vocabulary has 49,408 entries.
OPENAI_NUM_MERGES = 49152 - 256 - 2

# The pre-tokenisation regex, one alternative at a time (the first that matches wins):
#   <\|startoftext\|>|<\|endoftext\|>   the special tokens, kept whole if they appear in the text;
#   's|'t|'re|'ve|'m|'ll|'d             English contractions split off their word: "it's" -> it, 's;
#   [\p{L}]+                            a run of letters of any script: "café", "東京";
#   [\p{N}]                             ONE digit: numbers are spelled digit by digit, so "2023"
#                                       is 2, 0, 2, 3 and no merge ever spans a number;
#   [^\s\p{L}\p{N}]+                    a run of anything else but whitespace: punctuation,
#                                       symbols, emoji ("!!", "-", "🙂").
# Whitespace matches nothing and is dropped: unlike GPT-2, which keeps the leading space in its
# tokens, CLIP marks word ends with `</w>` on the last symbol. IGNORECASE changes nothing for
# plain lower-cased text but is OpenAI's flag (it lets `'s` also match `'ſ`, the long s), so we
# keep it for identical ids.
PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """A one-to-one map from the 256 byte values to 256 printable unicode characters.

    BPE runs on strings, and we want it to run on UTF-8 *bytes* so that any text, in any script
    or with any emoji, is representable without an unknown token. The merges file, however, is
    text, separated by spaces and newlines, so a byte cannot stand for itself: 0x20 (space) or
    0x0A (newline) would break the file format, and control characters are unreadable. So the
    188 bytes that already print as a single visible character ('!'..'~', '¡'..'¬', '®'..'ÿ')
    keep their own character, and the other 68 (control characters, space, soft hyphen, ...)
    are shifted to the characters 256, 257, ... in order: byte 0x20 becomes 'Ġ' (U+0120).
    The dict's order (printable bytes first, then the shifted ones) is the order of the first
    256 token ids, as in OpenAI's vocabulary: '!' is id 0 and byte 0x00 is id 188.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return table


def clean(text: str) -> str:
    """ftfy fix, HTML unescape (twice), collapse whitespace, strip, lower-case (OpenAI's order)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def pre_tokenize(text: str) -> list[str]:
    """Cleaned text cut into regex words, each written with the byte characters of its UTF-8 bytes."""
    byte_chars = bytes_to_unicode()
    return ["".join(byte_chars[b] for b in word.encode("utf-8")) for word in PATTERN.findall(clean(text))]


def _split_word(word: str) -> tuple[str, ...]:
    """A word as its initial symbols: one per character, `</w>` on the last."""
    return (*word[:-1], word[-1] + END_OF_WORD)


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every occurrence of `pair` in `symbols`, scanning left to right, by its concatenation."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def find_bpe_file(bpe_path: str | Path | None = None) -> Path:
    """OpenAI's merges file, looked for in this order: `bpe_path`, `$FREESEG_CLIP_BPE`, the copy
    cached by `freeseg.weights.download`, the copy inside an installed `clip` package."""
    for candidate, origin in ((bpe_path, "bpe_path"), (os.environ.get("FREESEG_CLIP_BPE"), "FREESEG_CLIP_BPE")):
        if candidate:
            if not Path(candidate).is_file():
                raise FileNotFoundError(f"BPE vocabulary file {candidate} (from {origin}) does not exist")
            return Path(candidate)
    cached = weights.cache_dir() / BPE_FILENAME
    if cached.is_file():
        return cached
    # find_spec locates clip-anytorch's folder without importing it (importing needs pkg_resources).
    spec = importlib.util.find_spec("clip")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            if (Path(folder) / BPE_FILENAME).is_file():
                return Path(folder) / BPE_FILENAME
    raise FileNotFoundError(
        f"OpenAI's BPE vocabulary ({BPE_FILENAME}) was not found. Get it with "
        f"`python -c \"from freeseg import weights; weights.download('bpe_simple_vocab_16e6')\"` "
        f"(caches it under {weights.cache_dir()}), or `pip install clip-anytorch`, or point "
        f"FREESEG_CLIP_BPE at a copy of the file.")


def read_merges(path: str | Path, num_merges: int = OPENAI_NUM_MERGES) -> list[tuple[str, str]]:
    """The first `num_merges` merges of a merges file (gzip or plain text); line 1 is a header."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().rstrip("\n").split("\n")[1:num_merges + 1]
    merges = [tuple(line.split()) for line in lines]
    bad = [i + 2 for i, m in enumerate(merges) if len(m) != 2]
    if bad:
        raise ValueError(f"{path}: line {bad[0]} is not a merge of two symbols")
    return merges


class Tokenizer:
    """Byte-level BPE with OpenAI's merges (default) or with given `merges` (e.g. from `learn_bpe`)."""

    def __init__(self, bpe_path: str | Path | None = None, merges: Sequence[tuple[str, str]] | None = None):
        self.merges = [tuple(m) for m in merges] if merges is not None else read_merges(find_bpe_file(bpe_path))
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        bytes_ = list(self.byte_encoder.values())
        vocab = [*bytes_, *(c + END_OF_WORD for c in bytes_), *("".join(m) for m in self.merges), SOT, EOT]
        self.vocab_size = len(vocab)
        # If two merges spell the same symbol, the later id wins, as in OpenAI's dict(zip(vocab, ids)).
        self.encoder = {symbol: i for i, symbol in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self.sot_token, self.eot_token = self.encoder[SOT], self.encoder[EOT]
        # Word -> its BPE symbols. Seeded with the special tokens so that "<|endoftext|>" written
        # in a text stays one token (OpenAI does the same).
        self.cache: dict[str, tuple[str, ...]] = {SOT: (SOT,), EOT: (EOT,)}

    def bpe(self, word: str) -> tuple[str, ...]:
        """The BPE symbols of one pre-tokenised word (byte characters, without `</w>`)."""
        if word in self.cache:
            return self.cache[word]
        symbols = _split_word(word)
        while len(symbols) > 1:
            # The pair of this word that was merged earliest in training; merges are applied in
            # training order, which reproduces how the training corpus was segmented.
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self.ranks.get(p, len(self.ranks)))
            if pair not in self.ranks:
                break
            symbols = _merge(symbols, pair)
        self.cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without SOT/EOT."""
        return [self.encoder[s] for word in pre_tokenize(text) for s in self.bpe(word)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids: each `</w>` becomes a space, so "a cat." decodes to "a cat . "."""
        chars = "".join(self.decoder[int(i)] for i in ids)
        return bytes(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    def __call__(self, texts: str | Sequence[str], context_length: int = 77, truncate: bool = False) -> torch.Tensor:
        """[SOT] ids [EOT], zero-padded: (N, context_length) int64.

        Text that does not fit raises ValueError, unless `truncate`: then it is cut and its last
        token replaced by EOT (OpenAI's behaviour), so the feature is still read at an EOT.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        result = torch.zeros(len(texts), context_length, dtype=torch.long)  # 0 pads, as OpenAI
        for row, text in enumerate(texts):
            ids = [self.sot_token, *self.encode(text), self.eot_token]
            if len(ids) > context_length:
                if not truncate:
                    raise ValueError(f"text {text!r} is {len(ids)} tokens long with SOT/EOT, more than "
                                     f"the context length {context_length} (pass truncate=True to cut it)")
                ids = ids[:context_length - 1] + [self.eot_token]
            result[row, :len(ids)] = torch.tensor(ids)
        return result


def learn_bpe(texts: Iterable[str], num_merges: int) -> list[tuple[str, str]]:
    """Learn up to `num_merges` merges from a corpus (Sennrich et al. 2016, algorithm 1).

    Same cleaning, regex and byte characters as the tokenizer. At each step the most frequent
    adjacent pair over all words (weighted by word count) is merged; ties go to the
    lexicographically smallest pair, so the result is deterministic. Stops early when every word
    is a single symbol.
    """
    words: Counter[tuple[str, ...]] = Counter(_split_word(w) for text in texts for w in pre_tokenize(text)
                                              if w not in (SOT, EOT))
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, count in words.items():
            merged[_merge(symbols, best)] += count
        words = merged
    return merges


@functools.cache
def default_tokenizer() -> Tokenizer:
    """OpenAI's tokenizer, built once (reading the 48,894 merges takes a fraction of a second)."""
    return Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = 77, truncate: bool = False) -> torch.Tensor:
    """OpenAI's `clip.tokenize`: (N, context_length) int64 ids of `texts` with OpenAI's vocabulary."""
    return default_tokenizer()(texts, context_length=context_length, truncate=truncate)
