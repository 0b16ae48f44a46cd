"""Datasets: versioned examples `{input, output, meta}` in named splits.

    ds, report = import_dataset(workspace, "data/support/", name="support")  # read + check, refuses on errors
    ds = get_dataset(workspace, "support")          # newest version; "support@1a2b3c" for one
    ds.split("test")                                # list[Example]
    ds = split_dataset(workspace, "support", test=0.1, validation=0.1, seed=0)  # a new version

Modules: `examples` (Example, Dataset, the store of versions), `read` (files to examples, every
problem an Issue), `check` (the check report, import), `split` (the one way to split, hold out and
sample, used by fine-tuning and the flow too).
"""

from tunelab.datasets.check import (CheckFailed, CheckReport, check_dataset, check_examples, check_path, default_name,
                                    import_dataset)
from tunelab.datasets.examples import (SPLITS, Dataset, Example, content_version, dataset_rows, get_dataset, get_split,
                                       infer_labels, normalize_input, parse_ref, save_dataset, validate_name)
from tunelab.datasets.read import FILE_FORMATS, Issue, SplitFile, read_file, read_source
from tunelab.datasets.split import holdout, split_dataset, split_examples, subsample

__all__ = ["CheckFailed", "CheckReport", "Dataset", "Example", "FILE_FORMATS", "Issue", "SPLITS", "SplitFile",
           "check_dataset", "check_examples", "check_path", "content_version", "dataset_rows", "default_name",
           "get_dataset", "get_split", "holdout", "import_dataset", "infer_labels", "normalize_input",
           "parse_ref", "read_file", "read_source", "save_dataset", "split_dataset", "split_examples",
           "subsample", "validate_name"]
