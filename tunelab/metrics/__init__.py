"""Metrics: a per-example score plus an aggregate, each with a 95% interval.

    metrics = make_metrics(["accuracy", "macro_f1"], output)     # or default_metric_names(output)
    answers = [Answer(expected="spam", prediction="ham"), ...]
    values = aggregate(metrics, answers)                         # {name: MetricValue}
    values["accuracy"].value, values["accuracy"].lo, values["accuracy"].hi

Modules: `base` (Answer, Metric, MetricValue), `labels`, `json`, `text` (the metrics of each output
type), `aggregate` (names to metrics, scoring, aggregates). The primary metric (`primary_metric`:
an output's `metric` when it names one, else its type's, `PRIMARY`) is what comparisons, the
optimizer, early stopping, a fine-tune search and the hybrid maximize:

| output | primary | why |
|---|---|---|
| label | accuracy | per-example correctness; macro_f1 beside it, and primary with `metric: macro_f1` (skewed labels) |
| json | field_f1 | credits every right field (json_match gives 0 to an answer with one field wrong) |
| text | chrf | sacrebleu's chrF against every reference: stable on one-sentence outputs, credits near misses |

Names (unknown -> NotFound):

| output | name | per example | aggregate |
|---|---|---|---|
| label | accuracy | prediction == expected | mean, Wilson interval |
| label | macro_f1 | - | mean of per-label F1 (labels seen in expected or predicted), bootstrap |
| label | format_valid | the free answer names a valid label (rows outside the free-answer sample: not counted; no free answer asked for: prediction is a label) | mean |
| label | free_accuracy | the label named by the free answer == expected | mean |
| json | json_valid | the prediction parses as JSON | mean |
| json | json_schema | it also validates against the output schema (jsonschema) | mean |
| json | format_valid | parses, and validates against the schema when there is one | mean |
| json | field_f1 / field_precision / field_recall | per-field agreement of the JSON objects | micro over fields, bootstrap |
| json | json_match | the parsed objects are equal | mean |
| text | chrf / bleu | sentence chrF / BLEU (sacrebleu) against every reference | corpus chrF / BLEU from summed sacrebleu statistics, bootstrap |
| text | rouge_l | best ROUGE-L F over the references (rouge-score) | mean, bootstrap |
| text | semantic | best cosine of MiniLM sentence embeddings over the references | mean, bootstrap |
| text | length_ratio / copy_rate | words vs the closest reference / share of words found in the input | mean, bootstrap |
| text | exact_match / normalized_match / contains | equal to (contains) a reference, as is / normalized | mean |
| text | regex:PATTERN | the prediction matches PATTERN (re.search) | mean |
| any | module:function | `function(example, prediction) -> float` | mean |

References: a text example's `meta.refs` (a list of strings) when the data has several, else its
expected output; a run stores them with each row (`extra["refs"]`) so a stored run re-aggregates
without the dataset.

Every metric reduces each example to a row of sufficient statistics (`Metric.stats`) and computes
its value from their column sums (`Metric.value`); the bootstrap in `tunelab.stats` resamples those
rows. With `--repeat K` the rows of one example are averaged first, so intervals are over
examples, not over repeats. A metric whose per-example scores are all 0 or 1 (and one repeat)
gets a Wilson interval; every other metric a seeded bootstrap.

`output` is the prompt's `OutputSpec` (or its stored dict; None: text).

More metrics plug in through the `tunelab.metrics` entry point group, the way the LLM-as-judge
does (`judge`, `judge:MODEL`: `tunelab.judge`): an entry point NAME is called as
`factory(spec, output, workspace) -> Metric` for the metric `NAME` or `NAME:ARG`. A metric that
answers best in batches (a judge model) overrides `score_many`.
"""

from tunelab.metrics.aggregate import (ENTRY_POINTS, OUTPUT_TYPES, PRIMARY, SIMPLE, Custom, aggregate,
                                       default_metric_names, example_metric, example_stats, group_rows, load_custom,
                                       make_metric, make_metrics, metric_names, plugin_metrics, primary_metric,
                                       score_answers)
from tunelab.metrics.base import Answer, Metric, MetricValue
from tunelab.metrics.json import (FieldF1, JsonMatch, JsonSchemaValid, JsonValid, field_counts, field_details,
                                  parse_json, schema_validator)
from tunelab.metrics.labels import Accuracy, FormatValid, FreeAccuracy, MacroF1
from tunelab.metrics.text import (Contains, CopyRate, ExactMatch, LengthRatio, NormalizedMatch, Regex, RougeL,
                                  SacreMetric, Semantic, bleu, chrf)

__all__ = ["Accuracy", "Answer", "Contains", "CopyRate", "Custom", "ENTRY_POINTS", "ExactMatch", "FieldF1",
           "FormatValid", "FreeAccuracy", "JsonMatch", "JsonSchemaValid", "JsonValid", "LengthRatio", "MacroF1",
           "Metric", "MetricValue", "NormalizedMatch", "OUTPUT_TYPES", "PRIMARY", "Regex", "RougeL", "SIMPLE",
           "SacreMetric", "Semantic", "aggregate", "bleu", "chrf", "default_metric_names", "example_metric", "example_stats",
           "field_counts", "field_details", "group_rows", "load_custom", "make_metric", "make_metrics",
           "metric_names", "parse_json", "plugin_metrics", "primary_metric", "schema_validator", "score_answers"]
