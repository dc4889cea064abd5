"""What the sidecar imports before it can answer `initialize`: nothing of MLX's model stack.

mlx-lm pulls in transformers (about a second on a CPU), huggingface_hub a quarter of one; they
are imported on the engine thread or on use, never on the way to the first answer. A module-level
import added for types or tidiness brings them back silently: this names it at once.
"""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("mlx_lm", "transformers", "huggingface_hub", "llguidance", "torch")


def test_serving_imports_none_of_the_model_stack_before_the_first_answer() -> None:
    code = ("import sys, sidecar.cli, sidecar.session; "
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert found == [], f"imported at start-up: {found}"
