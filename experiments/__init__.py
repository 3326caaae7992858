"""Experiments for torchpruner: studies that reproduce and extend the Shapley-pruning paper.

Run any study from the repository root, for example::

    python -m experiments.compare_criteria            # layer-wise robustness of the criteria
    python -m experiments.prune_during_training       # prune with the live optimizer
    python -m experiments.low_data                    # scores from a handful of examples
    python -m experiments.prune_untrained             # drop negative-Shapley units at init

Every script takes ``--help``. The default data set is scikit-learn's handwritten digits, which
ships with scikit-learn, so nothing is downloaded.
"""
