"""The public API: what ``import dmm_jax`` offers, what it costs, and the README's example."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import dmm_jax

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_public_name_resolves():
    assert dmm_jax.__all__ == sorted(dmm_jax.__all__)
    for name in dmm_jax.__all__:
        assert getattr(dmm_jax, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        dmm_jax.nothing  # noqa: B018


@pytest.mark.parametrize(
    "code",
    [
        "import dmm_jax; dmm_jax.__all__",
        "from dmm_jax.cli import build_parser; build_parser().format_help()",
    ],
)
def test_the_package_and_the_parser_load_without_jax(code):
    probe = f"import sys; {code}; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_readme_library_example_runs_as_written(jsb_path, tmp_path, monkeypatch):
    del jsb_path  # the example loads JSB from $DMM_JAX_DATA_DIR, as a user's setup would
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.DOTALL).group(1)
    small = {  # the example's settings, made small; each must appear as written
        "dmm_jax.DMMConfig()": "dmm_jax.DMMConfig(z_dim=3, emission_dim=8, transition_dim=8, "
        "rnn_dim=8)",
        "epochs=10": "epochs=1",
        "num_samples=100": "num_samples=2",
    }
    for written, replacement in small.items():
        assert written in code, f"README example no longer contains {written!r}"
        code = code.replace(written, replacement)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102  (the README, as a user runs it)
    assert namespace["rolls"].shape == (4, 64, 88)
    assert namespace["test"]["is_nll_per_step"] <= namespace["test"]["elbo_nll_per_step"]
    assert (tmp_path / "runs" / "jsb" / "checkpoint.msgpack").is_file()
