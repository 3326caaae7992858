"""Everything public is re-exported at the top level, lazily (no torchvision/captum at import)."""

import subprocess
import sys

import torchpruner


def test_every_export_resolves():
    for name in torchpruner.__all__:
        assert getattr(torchpruner, name) is not None, name
    from torchpruner import Pruner, ShapleyAttributionMetric  # the 2020 users' request
    from torchpruner.attributions import ShapleyAttributionMetric as Same
    from torchpruner.pruner import Pruner as SamePruner

    assert ShapleyAttributionMetric is Same and Pruner is SamePruner


def test_import_does_not_pull_torchvision_or_captum():
    code = (
        "import sys, torchpruner; from torchpruner import Pruner, TaylorAttributionMetric; "
        "print('torchvision' in sys.modules, 'captum' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
