import os
import sys

from hypothesis import HealthCheck, settings

# CI: derandomized, no deadline (2 shared cores are slow and noisy). Locally: no deadline either.
settings.register_profile(
    "ci", deadline=None, derandomize=True, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

os.environ.setdefault("TORCHPRUNER_PROGRESS", "0")

# The test folders mirror the package and hold no __init__.py (rootdir import mode "prepend"):
# every test module has a unique basename, and a module may import another folder's shared
# helpers by that name (``from test_attributions_groups import build``), whichever file runs.
_TESTS = os.path.dirname(os.path.abspath(__file__))
for _folder in sorted(os.listdir(_TESTS)):
    _path = os.path.join(_TESTS, _folder)
    if os.path.isdir(_path) and not _folder.startswith((".", "_")) and _path not in sys.path:
        sys.path.insert(0, _path)
