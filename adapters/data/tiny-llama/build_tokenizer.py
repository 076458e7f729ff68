"""Build the bundled tiny Llama's tokenizer (tokenizer.json, tokenizer_config.json) reproducibly, offline.

    python adapters/data/tiny-llama/build_tokenizer.py          # rewrites the two files next to this script
    python adapters/data/tiny-llama/build_tokenizer.py --check  # exits 1 if the files differ from a rebuild

The model has random weights, so the tokenizer only has to make serving work (`vllm serve`, `vllm bench serve`
without a network) and make token counts exact: a word-level vocabulary in which every token is a single
pre-token (a run of word characters, or a run of punctuation), so any sequence of token ids decodes to text
that encodes back to the same ids. That is what `vllm bench serve --dataset-name random` relies on, and it
makes a prompt of N words exactly N tokens (no BOS is added).

Vocabulary: vLLM's Llama special tokens at the ids config.json names (<unk> 0, <s> 1, </s> 2), then every
distinct word and punctuation run of the bundled corpus (the traces' NOTICE.md) by frequency, then filler
words `w00000`, ... up to the model's `vocab_size`, so the tokenizer and the model agree on the id range.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "traces" / "NOTICE.md"
SPECIAL = {"<unk>": 0, "<s>": 1, "</s>": 2}
# The `Whitespace` pre-tokenizer's pattern: a vocabulary token must match it whole to round-trip.
PRE_TOKEN = re.compile(r"\w+|[^\w\s]+")


def vocabulary(corpus: str, size: int) -> dict[str, int]:
    counts = Counter(PRE_TOKEN.findall(corpus))
    # Frequency first, then the word itself: a total order, so rebuilds are byte-identical.
    words = sorted(counts, key=lambda w: (-counts[w], w))
    vocab = dict(SPECIAL)
    for word in words:
        if len(vocab) == size:
            break
        vocab.setdefault(word, len(vocab))
    filler = 0
    while len(vocab) < size:
        vocab.setdefault(f"w{filler:05d}", len(vocab))
        filler += 1
    return vocab


def build(corpus: Path = CORPUS, config: Path = HERE / "config.json") -> dict[str, str]:
    """The two files' contents, by name."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    model_config = json.loads(config.read_text())
    vocab = vocabulary(corpus.read_text(encoding="utf-8"), model_config["vocab_size"])
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(list(SPECIAL))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": model_config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    return {
        "tokenizer.json": tokenizer.to_str() + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2) + "\n",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with a rebuild instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for name, text in build().items():
        path = HERE / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"stale: {', '.join(stale)}; rebuild with {Path(__file__).name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
