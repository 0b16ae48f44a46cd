"""Classical baselines as candidates: the answer to "do we even need an LLM for this?".

    cand = resolve_candidate(ws, "baseline:tfidf", data="support")   # trained on support's train split
    cand.name                                                        # baseline:tfidf:support@3f2a9c81d0e4
    evaluate(ws, cand, "support:test")                               # the same evaluator as every candidate

Trained in seconds on a dataset version's train split:

- `majority`: always the most frequent train output. Labels: scikit-learn's `DummyClassifier`, its
  label scores the train priors; JSON: that output verbatim (`{}` where most inputs have no
  field). The floor every candidate must clear;
- `tfidf` (labels): scikit-learn's `TfidfVectorizer` (word unigrams and bigrams, sublinear tf) and
  a `LogisticRegression`;
- `embed` (labels): the bundled all-MiniLM-L6-v2 sentence embeddings (`tunelab.demos.embed`, each
  input on its own, so a batch answers as a single request does) and a `LogisticRegression`;
- `nearest` (any output: labels, JSON, free text): the output of the most similar train input by
  the cosine of their TF-IDF vectors (scikit-learn's `NearestNeighbors`): retrieval, the classical
  reference of extraction and data-to-text, where the answer to a similar input is often most of
  the answer. Its answer has no label scores;
- `copy` (free text): the input itself, word for word — the identity baseline of data-to-text,
  rewriting and summarizing, which an LLM's text must beat to be worth its cost (on DART, echoing
  the triples scores chrF 0.456, above the zero-shot prompt's 0.306).

`majority` and `copy` are floors (the advice's "usable at all"), the others references.

For skewed labels (one label `SKEWED_SHARE` of train or more: the flow judges those by macro-F1)
the regressions are trained with or without class weights (`class_weight="balanced"`: each label
weighs the same), whichever has the better macro-F1 in a 3-fold cross-validation on train; the
stored record names the choice and both scores. Unweighted, a regression can learn the majority
only, a strawman of a reference row; weighted, it can lose (`_weighed_by_cv`).

A name is `baseline:METHOD[-nN][:DATASET[@VERSION]]`: `-nN` trains on a seeded, stratified sample of
N train examples (the sample a fine-tune's `max_examples` draws: the learning curve's points); the
dataset defaults to the one being evaluated (`data`), else the workspace's only dataset. The trained
classifier is stored under `artifacts/baselines/DATASET@VERSION/` (joblib) with its training time,
which is its setup cost (local $/hour), so it is trained once. A classifier's answer is the label; its
scores are the classifier's log-probabilities, so a hybrid or a threshold can read its confidence.
A JSON or text baseline answers like a prompt of that output type (inferred from the train
outputs: JSON when every one is an object or array, else text); a comparison hands it the output
spec of the candidates it is compared with, so it is scored by their metrics.
"""

from __future__ import annotations

import json
import re
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from tunelab.canonical import sha256
from tunelab.datasets import Example, dataset_rows, get_dataset, subsample
from tunelab.datasets.check import infer_output, skewed_labels
from tunelab.demos import embed, embed_one
from tunelab.errors import UserError
from tunelab.evaluate.candidates import Candidate, Setup
from tunelab.files import read_text, write_json
from tunelab.models.base import Completion, Model
from tunelab.prompts import OutputSpec

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

METHODS = ("majority", "tfidf", "embed", "nearest", "copy")
LABEL_ONLY = ("tfidf", "embed")  # classifiers: label outputs only
FLOORS = ("majority", "copy")  # answers that need no model of the task: what every candidate must beat
PREFIX = "baseline:"
CV_FOLDS = 3  # folds of the cross-validation that chooses a skewed-label regression's class weights
FORMAT = 2  # bump when a stored classifier's meaning changes: older ones are retrained (2: class weights)
_SPEC = re.compile(r"baseline:(?P<method>[a-z]+)(?:-n(?P<n>[0-9]+))?(?::(?P<data>[A-Za-z0-9][A-Za-z0-9_.\-]*"
                   r"(?:@[A-Za-z0-9]+)?))?")
_LOADED: dict[str, tuple[float, Any]] = {}  # artifact path -> (mtime, classifier): loaded once per process


def parse_baseline(spec: str) -> tuple[str, int | None, str | None]:
    """(method, max train examples or None, DATASET[@VERSION] or None) of `baseline:...`."""
    m = _SPEC.fullmatch(spec.strip())
    if m is None or m["method"] not in METHODS:
        raise UserError(f"unknown baseline '{spec}' (expected baseline:METHOD[:DATASET[@VERSION]] with METHOD one of "
                        f"{', '.join(METHODS)})")
    n = int(m["n"]) if m["n"] else None
    if n is not None and n < 1:
        raise UserError(f"baseline '{spec}': -nN needs N >= 1")
    return m["method"], n, m["data"]


def _features(method: str, texts: list[str], batched: bool = False):
    """The classifier's input: raw texts (tfidf: the pipeline vectorizes), MiniLM embeddings, or
    nothing to see (majority). Answers embed each input on its own (`batched` False), so an input
    gets the same vector in an evaluation batch and in a gateway request; training batches."""
    if method == "embed":
        if batched:
            return embed(texts)
        return np.stack([embed_one(t) for t in texts]) if texts else np.zeros((0, 384), np.float32)
    if method == "majority":
        return np.zeros((len(texts), 1), np.float32)
    return list(texts)


def _classifier(method: str):
    from sklearn.dummy import DummyClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    if method == "majority":
        return DummyClassifier(strategy="prior")
    if method == "tfidf":
        return make_pipeline(_tfidf(), LogisticRegression(C=10.0, max_iter=2000))
    return LogisticRegression(C=10.0, max_iter=2000)


def _tfidf():
    """The TF-IDF vectorizer of `tfidf` and `nearest`: word unigrams and bigrams, sublinear tf."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)


def _retrieval(method: str, inputs: list[str], outputs: list[str]) -> dict[str, Any]:
    """A baseline that answers without a classifier: `nearest` (the TF-IDF vectorizer, the
    cosine index over the train inputs and their outputs), `majority` of JSON outputs (the most
    frequent; at a tie the first in train order) or `copy` (the input itself)."""
    from collections import Counter

    if method == "copy":
        return {"copy": True}
    if method == "majority":
        counts = Counter(outputs)
        top = max(counts.values())
        return {"answer": next(o for o in outputs if counts[o] == top)}
    from sklearn.neighbors import NearestNeighbors

    vectorizer = _tfidf()
    index = NearestNeighbors(n_neighbors=1, metric="cosine", algorithm="brute").fit(vectorizer.fit_transform(inputs))
    return {"vectorizer": vectorizer, "index": index, "outputs": list(outputs)}


def _labels_of(clf: Any, kind: str, y: list[str]) -> list[str] | None:
    """The labels a stored baseline answers: a classifier's classes, a retrieval baseline's train
    labels, None for JSON or text."""
    if not isinstance(clf, dict):
        return [str(c) for c in clf.classes_]
    return sorted(set(y)) if kind == "label" else None


def _weighed_by_cv(method: str, features, y: list[str]) -> tuple[Any, str | None, dict[str, float]]:
    """For skewed labels: the regression without class weights or with each label weighing the same
    (`class_weight="balanced"`), whichever has the better macro-F1 in a stratified 3-fold
    cross-validation on train, refit on all of it. Neither wins everywhere: on legal_unfair_tos
    balanced weights took TF-IDF's test macro-F1 from 0.613 to 0.709 and the embeddings' from
    0.713 to 0.613; on tweeteval_emotion cut to 93% anger, unweighted TF-IDF learned the majority
    only. Returns (fitted classifier, the chosen class_weight, {"none"/"balanced": CV macro-F1})."""
    import warnings

    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    clf = _classifier(method)
    key = "logisticregression__class_weight" if method == "tfidf" else "class_weight"
    search = GridSearchCV(clf, {key: [None, "balanced"]}, scoring="f1_macro",
                          cv=StratifiedKFold(n_splits=CV_FOLDS, shuffle=True, random_state=0))
    with warnings.catch_warnings():  # labels with fewer than CV_FOLDS examples: sklearn warns, the folds still work
        warnings.simplefilter("ignore")
        search.fit(features, y)
    scores = {"none" if w is None else w: float(m) for w, m in zip(
        [p[key] for p in search.cv_results_["params"]], search.cv_results_["mean_test_score"])}
    return search.best_estimator_, search.best_params_[key], scores


def _weights_note(record: dict[str, Any]) -> str:
    """How a skewed-label regression's class weights were chosen, for its setup line ('' otherwise)."""
    cv = record.get("cv_macro_f1")
    if not cv:
        return ""
    scores = ", ".join(f"{k} {v:.3f}" for k, v in cv.items())
    return f"; class weights {record.get('class_weight') or 'none'} by {CV_FOLDS}-fold CV macro-F1 ({scores})"


def train_baseline(ws: "Workspace", method: str, dataset: str, max_examples: int | None = None) -> dict[str, Any]:
    """Train (or load the stored) baseline `method` on `dataset`'s train split (DATASET[@VERSION],
    at most `max_examples` of it). Returns its record: path, dataset ref, n_train, wall_s,
    output_type, labels (None for JSON or text)."""
    import joblib
    import sklearn

    ds = get_dataset(ws, dataset)
    suffix = f"-n{max_examples}" if max_examples else ""
    path = ws.artifact_path("baselines", f"{ds.name}@{ds.version}", f"{method}{suffix}.joblib")
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        meta = json.loads(read_text(meta_path))
        if meta.get("format") == FORMAT and meta.get("sklearn") == sklearn.__version__:
            return {**meta, "path": str(path)}
    full = ds.split("train")
    train = subsample(full, max_examples, 0)
    if len({ex.output for ex in train}) < 1:
        raise UserError(f"dataset {ds.ref} has no train examples to train baseline:{method} on")
    everything = [ex.output for ex in full]
    # the dataset's labels, else the flow's rule (`infer_output`); one distinct output: a majority answer
    kind = "label" if ds.labels is not None or len(set(everything)) == 1 else infer_output(everything)
    if method == "copy" and kind == "json":
        raise UserError(f"baseline:copy answers with its input; {ds.ref}'s outputs are JSON (baseline:nearest "
                        "answers any output, baseline:majority JSON)")
    if kind != "label" and (method in LABEL_ONLY or (method == "majority" and kind == "text")):
        raise UserError(f"baseline:{method} classifies labels; {ds.ref}'s outputs are "
                        f"{'JSON' if kind == 'json' else 'free text'} (baseline:nearest answers any output"
                        f"{', baseline:majority JSON' if kind == 'json' else ', baseline:copy free text'})")
    start = time.perf_counter()
    y = [ex.output for ex in train]
    class_weight, cv = None, None
    try:
        if method in ("nearest", "copy") or kind != "label":
            clf = _retrieval(method, [ex.input for ex in train], y)
        else:
            features = _features(method, [ex.input for ex in train], batched=True)
            if len(set(y)) == 1:  # one class: the majority answer whatever the method
                from sklearn.dummy import DummyClassifier
                clf = DummyClassifier(strategy="prior").fit(features, y)
            elif method != "majority" and skewed_labels("label", y):
                clf, class_weight, cv = _weighed_by_cv(method, features, y)
            else:
                clf = _classifier(method).fit(features, y)
    except ValueError as err:
        if "empty vocabulary" not in str(err):
            raise
        raise UserError(f"baseline:{method} on {ds.ref}: the train inputs have no words to weigh (TF-IDF counts "
                        "words of two or more letters or digits; these inputs have none)", field="input") from None
    wall = time.perf_counter() - start
    joblib.dump(clf, path)
    meta = {"format": FORMAT, "method": method, "dataset": ds.ref, "max_examples": max_examples,
            "n_train": 0 if method == "copy" else len(train),  # copy learns nothing from train
            "wall_s": wall, "output_type": kind, "labels": _labels_of(clf, kind, y),
            "class_weight": class_weight, "cv_macro_f1": cv, "sklearn": sklearn.__version__}
    write_json(meta_path, meta)
    return {**meta, "path": str(path)}


def _load(path: str):
    import joblib
    from pathlib import Path

    mtime = Path(path).stat().st_mtime
    hit = _LOADED.get(path)
    if hit is None or hit[0] != mtime:
        if len(_LOADED) > 32:
            _LOADED.clear()
        hit = _LOADED[path] = (mtime, joblib.load(path))  # our own workspace's artifact, written above
    return hit[1]


class BaselineCandidate(Candidate):
    """A classical baseline trained on a train split: a classifier answering with a label and its
    log-probabilities, or (`nearest`, `majority` of JSON, `copy`) a text (see the module doc). It
    calls no model: `map_models` is itself."""

    kind = "baseline"
    backend = "local"
    temperature = 0.0

    def __init__(self, record: dict[str, Any], labels: list[str] | None, pricing_per_hour: float = 0.0):
        self.method = record["method"]
        self.record = record
        n = record.get("max_examples")
        self.name = f"{PREFIX}{self.method}{f'-n{n}' if n else ''}:{record['dataset']}"
        self.model_name = f"{PREFIX}{self.method}"
        self.classifier = _load(record["path"])
        self.retrieval = isinstance(self.classifier, dict)  # answers with a train output (see `_retrieval`)
        self.classes = [] if self.retrieval else [str(c) for c in self.classifier.classes_]
        kind = record.get("output_type") or "label"
        if kind == "label":
            self.output = OutputSpec(type="label", labels=list(labels or self.classes or record.get("labels") or []))
        else:  # JSON or text, as inferred from train (a comparison gives it its candidates' spec)
            self.output = OutputSpec(type=kind)
        self.training_data = record["dataset"]
        self.setup = Setup(how="baseline", wall_s=float(record["wall_s"]),
                           compute_cost=pricing_per_hour * float(record["wall_s"]) / 3600.0,
                           examples=int(record["n_train"]),
                           sources=[f"{self.name}: trained on {record['n_train']:,} train examples of "
                                    f"{record['dataset']} in {record['wall_s']:.2f} s (scikit-learn "
                                    f"{record['sklearn']}{_weights_note(record)}), at the local $/hour"])

    @property
    def fingerprint(self) -> str:
        return sha256({"kind": self.kind, "method": self.method, "dataset": self.record["dataset"],
                       "n_train": self.record["n_train"], "max_examples": self.record.get("max_examples"),
                       "format": FORMAT, "sklearn": self.record["sklearn"],
                       "class_weight": self.record.get("class_weight")})

    def predict(self, examples: list[Example], repeat_index: int = 0) -> list[Completion]:
        if not examples:
            return []
        start = time.perf_counter()
        if self.retrieval:
            return self._retrieve(examples, start)
        proba = self.classifier.predict_proba(_features(self.method, [ex.input for ex in examples]))
        logp = np.log(np.clip(proba, 1e-12, 1.0))
        share = (time.perf_counter() - start) / len(examples)
        out = []
        for row in logp:
            scores = {label: round(float(v), 6) for label, v in zip(self.classes, row)}
            best = max(self.classes, key=lambda c: (scores[c], -self.classes.index(c)))  # ties: the first class
            out.append(Completion(text=best, latency_s=share, label_logprobs=scores, meta={"baseline": self.method}))
        return out

    def _retrieve(self, examples: list[Example], start: float) -> list[Completion]:
        """The answers of a baseline without a classifier: the nearest train input's output, the
        one answer, or the input itself."""
        found = self.classifier
        if found.get("copy"):
            texts = [ex.input for ex in examples]
        elif "answer" in found:
            texts = [found["answer"]] * len(examples)
        else:
            _, nearest = found["index"].kneighbors(found["vectorizer"].transform([ex.input for ex in examples]))
            texts = [found["outputs"][int(row[0])] for row in nearest]
        share = (time.perf_counter() - start) / len(examples)
        return [Completion(text=t, latency_s=share, meta={"baseline": self.method}) for t in texts]

    def map_models(self, fn: Callable[[Model], Model]) -> "BaselineCandidate":
        return self

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "baseline": {k: v for k, v in self.record.items() if k != "path"}}


def baseline_candidate(ws: "Workspace", spec: str, data: str | None = None) -> BaselineCandidate:
    """`baseline:METHOD[-nN][:DATASET[@VERSION]]`, trained (once) on the dataset's train split;
    without a dataset in the name, `data` (DATASET[@VERSION][:SPLIT]: the split being evaluated),
    else the workspace's only dataset."""
    method, n, named = parse_baseline(spec)
    dataset = named or (data.split(":", 1)[0] if data else None)
    if dataset is None:
        names = sorted({row.name for row in dataset_rows(ws)})
        if len(names) != 1:
            raise UserError(f"'{spec}' needs its training data: baseline:{method}:DATASET[@VERSION] "
                            f"(datasets: {', '.join(names) or 'none yet'})")
        dataset = names[0]
    record = train_baseline(ws, method, dataset, n)
    ds = get_dataset(ws, record["dataset"])
    pricing = ws.pricing_for(f"{PREFIX}{method}", "local")
    return BaselineCandidate(record, ds.labels, pricing.per_hour)


def list_baselines(ws: "Workspace") -> list[str]:
    """The names of the baselines trained in this workspace (on a whole train split), sorted."""
    folder = ws.artifacts_dir / "baselines"
    names = []
    for meta in sorted(folder.glob("*/*.json")) if folder.is_dir() else []:
        if meta.with_suffix(".joblib").is_file() and "-n" not in meta.stem and meta.stem in METHODS:
            names.append(f"{PREFIX}{meta.stem}:{meta.parent.name}")
    return names
