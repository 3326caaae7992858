import os

from hypothesis import HealthCheck, settings

# CI: derandomized, no deadline (2 shared cores are slow and noisy). Locally: no deadline either.
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

os.environ.setdefault("TORCHPRUNER_PROGRESS", "0")
