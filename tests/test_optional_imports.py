"""`import torchrewind` never imports a framework; an integration without its framework says what to install."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("hf", ["transformers"], "hf"),
        ("lightning", ["lightning", "lightning.pytorch", "pytorch_lightning"], "lightning"),
    ],
)
def test_integration_imports_its_framework_only_when_imported(module, blocked, extra):
    code = (
        f"import sys; import torchrewind, torchrewind.integrations; assert {blocked[0]!r} not in sys.modules\n"
        + "".join(f"sys.modules[{b!r}] = None\n" for b in blocked)
        + f"try:\n    import torchrewind.integrations.{module}\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"pip install torchrewind[{extra}]" in out.stdout
