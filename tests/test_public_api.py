"""The top-level package: every name it promises resolves, the names of earlier versions stay, and
``import switchformer`` (and ``switchformer --help``) load nothing heavy."""

from __future__ import annotations

import subprocess
import sys

import switchformer

# what the package exported before the redesign, by name: these keep their spelling
EARLIER = ["SwitchMoE", "MoEAux", "load_balancing_loss", "router_z_loss", "SwitchT5", "SwitchT5Config", "SwitchLM",
           "SwitchLMConfig", "dense_twin_config", "from_hf", "to_hf", "__version__"]  # fmt: skip


def test_every_promised_name_resolves_and_the_earlier_ones_stay():
    for name in switchformer.__all__:
        assert getattr(switchformer, name) is not None, name
    assert set(EARLIER) <= set(switchformer.__all__)
    tokens = switchformer.span_corruption_lengths(100)
    assert tokens[0] <= 100 and tokens[1] > 0


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    return set(out.stdout.split())


def test_importing_the_package_and_building_the_parser_load_nothing_heavy():
    heavy = {"transformers", "tokenizers", "fastapi", "uvicorn", "matplotlib", "sacrebleu", "safetensors"}
    assert not heavy & _modules_after("import switchformer")
    parser = _modules_after("from switchformer.cli import build_parser\nbuild_parser()")
    assert not heavy & parser and "switchformer.train.trainer" not in parser, "--help should not load the library"
