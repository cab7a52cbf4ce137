import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import eosflow.process  # noqa: E402,F401  (enables float64, registers processes)
