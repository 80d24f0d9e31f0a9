"""The training defaults are written once: FitConfig, the fit and crossfit command lines and the Makefile agree."""

from __future__ import annotations

import re
import shlex
from dataclasses import replace
from pathlib import Path
from typing import get_args

from bayesnet.pretrained import LITE0_ARCH, InitSource
from train.__main__ import build_parser, crossfit_recipe, fit_config
from train.config import DEMO_RECIPE, INIT_SOURCES, FitConfig, field_defaults

REPO = Path(__file__).resolve().parents[2]
TRAIN, OUT = Path("train.csv"), Path("runs/x")


def _makefile_variable(name: str) -> list[str]:
    """The words of a ``NAME ?= ...`` assignment in the Makefile, continuation lines joined."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    match = re.search(rf"^{name} \?=(.*)$", text, flags=re.MULTILINE)
    assert match is not None, f"{name} is not assigned in the Makefile"
    return shlex.split(match.group(1))


def test_fit_command_line_defaults_are_fit_configs() -> None:
    args = build_parser().parse_args(["fit", "--train", str(TRAIN), "--out", str(OUT)])
    assert fit_config(args) == FitConfig(train_csv=TRAIN, out=OUT)


def test_fit_options_reach_the_config() -> None:
    argv = ["fit", "--train", str(TRAIN), "--out", str(OUT), "--epochs", "3", "--lr", "2e-4", "--amp", "off"]
    argv += ["--max-train-samples", "50", "--valid", "valid.csv", "--resume", "--no-progress"]
    config = fit_config(build_parser().parse_args(argv))
    expected = FitConfig(
        train_csv=TRAIN,
        out=OUT,
        valid_csv=Path("valid.csv"),
        epochs=3,
        lr=2e-4,
        amp="off",
        max_train_samples=50,
        resume=True,
        progress=False,
    )
    assert config == expected


def test_crossfit_defaults_are_the_demo_recipe() -> None:
    args = build_parser().parse_args(["crossfit", "--data", str(TRAIN), "valid.csv", "--out", str(OUT)])
    assert crossfit_recipe(args) == FitConfig(train_csv=TRAIN, out=OUT, progress=False, **DEMO_RECIPE)


def test_the_demo_recipe_only_names_departures_from_the_defaults() -> None:
    defaults = field_defaults()
    assert set(DEMO_RECIPE) <= set(defaults)
    assert all(defaults[name] != value for name, value in DEMO_RECIPE.items())


def test_recipe_demo_gives_the_demo_recipe_and_options_still_win() -> None:
    base = ["fit", "--train", str(TRAIN), "--out", str(OUT), "--recipe", "demo"]
    assert fit_config(build_parser().parse_args(base)) == FitConfig(train_csv=TRAIN, out=OUT, **DEMO_RECIPE)
    tuned = fit_config(build_parser().parse_args([*base, "--epochs", "3"]))
    assert tuned == FitConfig(train_csv=TRAIN, out=OUT, **{**DEMO_RECIPE, "epochs": 3})


def test_make_demo_model_trains_the_demo_recipe() -> None:
    """`make demo-model` names the demo recipe and the model's name, no value of the recipe itself."""
    assert _makefile_variable("DEMO_FIT_ARGS") == ["--recipe", "demo", "--name", "bayesnet-cxr-demo"]
    argv = ["fit", "--train", str(TRAIN), "--out", str(OUT), *_makefile_variable("DEMO_FIT_ARGS")]
    config = fit_config(build_parser().parse_args(argv))
    expected = replace(FitConfig(train_csv=TRAIN, out=OUT, **DEMO_RECIPE), name="bayesnet-cxr-demo")
    assert config == expected


def test_light_copies_of_bayesnet_constants_agree() -> None:
    """train/config.py repeats two bayesnet values so that the command line needs no torch."""
    assert FitConfig.arch == LITE0_ARCH
    assert get_args(InitSource) == INIT_SOURCES
