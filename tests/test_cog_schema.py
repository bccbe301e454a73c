"""The schema users and Replicate's API see: `cog build` reads predict.py statically, so every Input() value must be a
literal its parser resolves; the schema must hold each input's enum, bounds, default and description (the licence
notice too), equal to what lib/ defines; and predict.py must give the parser nothing to drop.

The parser's rules are checked here on cog's own test cases (replicate/cog, pkg/schema/python/parser_test.go: the
test names are cog's), so this reader follows cog rather than our idea of it."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import predict
from lib import ROOT, cog_schema
from lib.engine import inputs, modes
from lib.engine.modes import DEFAULT_MODE, MODES, NON_COMMERCIAL

HEADER = "from typing import Iterator, Optional\nfrom cog import BasePredictor, BaseRunner, Input, Path, concurrent\n"


def read_source(tmp_path: Path, body: str, scope: str = "") -> cog_schema.Reading:
    """cog_schema.read() of a predict.py made of `scope` (module-level lines) and `body`."""
    path = tmp_path / "predict.py"
    path.write_text(HEADER + scope + "\n" + textwrap.dedent(body))
    return cog_schema.read(path)


# -- cog's parser rules, on cog's own cases -------------------------------------------------------------------------
CHOICES_RESOLVED = {
    "TestChoicesLiteralList": ('color: str = Input(choices=["red", "green", "blue"])', "", ["red", "green", "blue"]),
    "TestChoicesModuleLevelListVar": (
        "v: str = Input(choices=MY_CHOICES)",
        'MY_CHOICES = ["x", "y", "z"]',
        ["x", "y", "z"],
    ),
    "TestChoicesListDictKeys": (
        'ar: str = Input(choices=list(ASPECT_RATIOS.keys()), default="1:1")',
        'ASPECT_RATIOS = {"1:1": (1024, 1024), "16:9": (1344, 768), "2:3": (832, 1216)}',
        ["1:1", "16:9", "2:3"],
    ),
    "TestChoicesListDictValues": (
        "m: str = Input(choices=list(LABELS.values()))",
        'LABELS = {"fast": "Fast Mode", "slow": "Slow Mode"}',
        ["Fast Mode", "Slow Mode"],
    ),
    "TestChoicesDictKeysPlusLiteral": (
        's: str = Input(choices=list(SIZES.keys()) + ["custom"])',
        'SIZES = {"small": 256, "large": 1024}',
        ["small", "large", "custom"],
    ),
    "TestChoicesIntegerDictKeys": (
        "steps: int = Input(choices=list(STEP_LABELS.keys()), default=1)",
        'STEP_LABELS = {1: "one", 2: "two", 4: "four"}',
        [1, 2, 4],
    ),
    "TestChoicesConcatTwoVars": (
        "x: str = Input(choices=BASE + EXTRA)",
        'BASE = ["a", "b"]\nEXTRA = ["c"]',
        ["a", "b", "c"],
    ),
}


@pytest.mark.parametrize("param, scope, expected", CHOICES_RESOLVED.values(), ids=CHOICES_RESOLVED.keys())
def test_choices_cog_resolves(tmp_path, param, scope, expected):
    reading = read_source(
        tmp_path,
        f"""
        class Predictor(BasePredictor):
            def predict(self, {param}) -> str:
                pass
        """,
        scope,
    )
    assert next(iter(reading.inputs.values())).choices == expected


CHOICES_REFUSED = {
    "TestChoicesVarNotAListErrors": ("x: str = Input(choices=NOT_A_LIST)", 'NOT_A_LIST = "oops"'),
    "TestChoicesUndefinedVarErrors": ("x: str = Input(choices=DOES_NOT_EXIST)", ""),
    "TestChoicesArbitraryCallErrors": ("x: str = Input(choices=get_choices())", ""),
    "TestChoicesListComprehensionErrors": ('x: str = Input(choices=[f"{i}x" for i in range(5)])', ""),
    "TestChoicesErrorIncludesParamName": ("my_param: str = Input(choices=some_func())", ""),
    "TestChoicesNestedVarNotInScope": ("x: str = Input(choices=NESTED)", 'def helper():\n    NESTED = ["a", "b"]'),
    # What predict.py used to write: a call on a name imported from lib.
    "list-of-an-imported-dict": ("mode: str = Input(choices=list(MODES))", "from lib.engine.modes import MODES"),
}


@pytest.mark.parametrize("param, scope", CHOICES_REFUSED.values(), ids=CHOICES_REFUSED.keys())
def test_choices_cog_cannot_resolve_stop_the_build(tmp_path, param, scope):
    with pytest.raises(cog_schema.SchemaError, match=r"parameter '(x|my_param|mode)': choices expression"):
        read_source(
            tmp_path,
            f"""
            class Predictor(BasePredictor):
                def predict(self, {param}) -> str:
                    pass
            """,
            scope,
        )


def test_literal_values_cog_keeps(tmp_path):
    """TestMultipleInputsWithDefaults, TestDefaultModuleLevelStringInInput, TestDescriptionFromModuleLevelVar,
    TestOptionalInputTyping: literals and module-level literals are kept; an Optional is nullable, not required."""
    reading = read_source(
        tmp_path,
        """
        DEFAULT_NAME = "world"
        HELP = "Who to greet"

        class Predictor(BasePredictor):
            def predict(
                self,
                image: Path = Input(description="Grayscale input image"),
                scale: float = Input(description="Factor to scale image by", ge=0, le=10, default=1.5),
                name: str = Input(default=DEFAULT_NAME, description=HELP),
                seed: Optional[int] = Input(default=None, ge=-1, le=4294967295),
            ) -> Path:
                pass
        """,
    )
    assert not reading.problems
    props = cog_schema.openapi(reading)["components"]["schemas"]["Input"]
    assert props["required"] == ["image"]
    image, scale, name, seed = (props["properties"][k] for k in ("image", "scale", "name", "seed"))
    assert image == {
        "x-order": 0,
        "title": "Image",
        "type": "string",
        "format": "uri",
        "description": "Grayscale input image",
    }
    assert (scale["minimum"], scale["maximum"], scale["default"], scale["type"]) == (0, 10, 1.5, "number")
    assert (name["default"], name["description"]) == ("world", "Who to greet")
    assert (seed["nullable"], seed["default"], seed["minimum"], seed["maximum"]) == (True, None, -1, 4294967295)


def test_values_cog_drops_silently_are_problems(tmp_path):
    """What predict.py used to write: bounds and descriptions computed from lib, which cog drops without a word."""
    reading = read_source(
        tmp_path,
        """
        from lib.engine import inputs, modes

        class Predictor(BaseRunner):
            async def run(
                self,
                width: int = Input(default=512, ge=inputs.SIZE_RANGE[0], le=2**11),
                steps: int = Input(default=DEFAULT_STEPS, description=modes.steps_help()),
                seed: int = Input(default=0, description="adjacent " "literals"),
                tag: str = Input("positional", default="a", description="it\\'s"),
            ) -> Iterator[Path]:
                pass
        """,
    )
    problems = "\n".join(reading.problems)
    assert "width: ge=inputs.SIZE_RANGE[0] is not a number literal" in problems
    assert "width: le=2**11 is not a number literal" in problems
    assert "steps: default `DEFAULT_STEPS` is not a literal: cog would show the default as null" in problems
    assert "steps: description `modes.steps_help()` is not a string literal" in problems
    assert 'seed: description "adjacent " "literals" reads as \'adjacent " "literals\' to cog' in problems
    assert "tag: positional arguments to Input() are ignored by cog" in problems
    assert "tag: description" in problems  # the escape is not decoded by cog
    with pytest.raises(cog_schema.SchemaError, match="would drop or change"):
        cog_schema.schema(tmp_path)


def test_concurrency_and_output_as_cog_reads_them(tmp_path):
    """TestConcurrentDecoratorImportedMax, TestConcurrentDecoratorRequiresAsyncForMaxGreaterThanOne,
    TestIteratorOutput."""
    reading = read_source(
        tmp_path,
        """
        class Predictor(BaseRunner):
            @concurrent(max=4)
            async def run(self, prompt: str) -> Iterator[Path]:
                pass
        """,
    )
    assert reading.concurrency_max == 4
    assert reading.output == {
        "type": "array",
        "items": {"type": "string", "format": "uri"},
        "x-cog-array-type": "iterator",
    }
    with pytest.raises(cog_schema.SchemaError, match="requires an async"):
        read_source(
            tmp_path,
            """
            class Predictor(BaseRunner):
                @concurrent(max=4)
                def run(self, prompt: str) -> str:
                    pass
            """,
        )


# -- predict.py ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def schema() -> dict:
    return cog_schema.schema(ROOT)


def test_predict_py_gives_cogs_parser_nothing_to_drop():
    reading = cog_schema.read(ROOT / "predict.py")
    assert reading.problems == []
    assert reading.concurrency_max == 8 and inspect.iscoroutinefunction(predict.Predictor.run)


def defaults_of_resolve_request() -> dict:
    return {k: p.default for k, p in inspect.signature(inputs.resolve_request).parameters.items()}


def expected_inputs() -> dict:
    """Every input as lib/ defines it: (enum, minimum, maximum, default) - None where the schema has none."""
    d = defaults_of_resolve_request()
    steps, guidance = modes.steps_bounds(), modes.guidance_bounds()
    return {
        "prompt": (None, None, None, None),
        "negative_prompt": (None, None, None, d["negative_prompt"]),
        "mode": (list(MODES), None, None, DEFAULT_MODE),
        "width": (None, *inputs.SIZE_RANGE, d["width"]),
        "height": (None, *inputs.SIZE_RANGE, d["height"]),
        "num_outputs": (None, *inputs.NUM_OUTPUTS_RANGE, d["num_outputs"]),
        "num_inference_steps": (None, *steps, d["num_inference_steps"]),
        "guidance_scale": (None, *guidance, d["guidance_scale"]),
        "seed": (None, *inputs.SEED_RANGE, d["seed"]),
        "image": (None, None, None, d["image"]),
        "strength": (None, *inputs.STRENGTH_RANGE, d["strength"]),
        "output_format": (list(inputs.OUTPUT_FORMATS), None, None, d["output_format"]),
        "output_quality": (None, *inputs.QUALITY_RANGE, d["output_quality"]),
        "lora_url": (None, None, None, d["lora_url"]),
        "lora_scale": (None, *inputs.LORA_SCALE_RANGE, d["lora_scale"]),
        "disable_safety_checker": (None, None, None, d["disable_safety_checker"]),
        "fast_decode": (None, None, None, d["fast_decode"]),
        **control_inputs(),
    }


def control_inputs() -> dict:
    """The ControlNet inputs as lib/engine/inputs.py defines them (control_specs' defaults, the kinds and ranges)."""
    c = {k: p.default for k, p in inspect.signature(inputs.control_specs).parameters.items()}
    kinds = list(modes.CONTROL_KINDS)
    scale, window = inputs.CONTROL_SCALE_RANGE, inputs.CONTROL_WINDOW_RANGE
    out = {}
    for prefix, choices in (("control", kinds), ("control_2", [inputs.NO_CONTROL, *kinds])):
        out[f"{prefix}_image"] = (None, None, None, c[f"{prefix}_image"])
        out[f"{prefix}_type"] = (choices, None, None, c[f"{prefix}_type"])
        out[f"{prefix}_scale"] = (None, *scale, c[f"{prefix}_scale"])
        out[f"{prefix}_start"] = (None, *window, c[f"{prefix}_start"])
        out[f"{prefix}_end"] = (None, *window, c[f"{prefix}_end"])
    # The schema's order is predict.py's: the second control's image after its type.
    order = ["control_image", "control_type", "control_scale", "control_start", "control_end", "control_2_type"]
    order += ["control_2_image", "control_2_scale", "control_2_start", "control_2_end"]
    maps = inspect.signature(inputs.resolve_request).parameters["return_control_maps"].default
    return {k: out[k] for k in order} | {"return_control_maps": (None, None, None, maps)}


def test_schema_holds_every_input_as_lib_defines_it(schema):
    components = schema["components"]["schemas"]
    props = components["Input"]["properties"]
    assert list(props) == list(expected_inputs())  # same inputs, in the same order (x-order)
    assert components["Input"]["required"] == ["prompt"]
    for name, (enum, lo, hi, default) in expected_inputs().items():
        p = props[name]
        got_enum = components[name]["enum"] if "allOf" in p else None
        assert (got_enum, p.get("minimum"), p.get("maximum")) == (enum, lo, hi), name
        assert p.get("default", "required") == (default if name != "prompt" else "required"), name
        assert p.get("description"), f"{name} has no description on the model page"
    assert props["mode"]["description"] == modes.mode_help()
    assert props["num_inference_steps"]["description"] == modes.steps_help()
    assert props["guidance_scale"]["description"] == modes.guidance_help()
    # The modes that take a control, as the mode table says.
    assert f"modes {', '.join(modes.control_modes())}," in props["control_image"]["description"]
    assert props["image"]["format"] == "uri"
    assert components["Output"]["x-cog-array-type"] == "iterator"


def test_the_licence_notice_reaches_the_model_page(schema):
    description = schema["components"]["schemas"]["Input"]["properties"]["mode"]["description"]
    for m in MODES.values():
        part = description.split(f"{m.name}: ", 1)[1].split("; ", 1)[0]
        non_commercial = m.weights.repo.licence == NON_COMMERCIAL
        assert ("non-commercial use only" in part) == non_commercial, part


def test_predict_py_literals_equal_lib():
    """The literals predict.py repeats, equal to their source in lib/ (the schema test checks the Input() values)."""
    assert predict.MODES == list(MODES)
    assert predict.MODE_HELP == modes.mode_help()
    assert predict.STEPS_HELP == modes.steps_help()
    assert predict.GUIDANCE_HELP == modes.guidance_help()
    assert predict.OUTPUT_FORMATS == list(inputs.OUTPUT_FORMATS)


def test_the_cli_prints_the_schema_and_refuses_a_predict_py_cog_would_not_read(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lib.cog_schema"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["info"] == {"title": "Cog", "version": cog_schema.COG_VERSION}
    broken = tmp_path / "predict.py"
    broken.write_text((ROOT / "predict.py").read_text().replace("choices=MODES", "choices=list(MODES_TABLE)"))
    with pytest.raises(
        cog_schema.SchemaError, match="parameter 'mode': choices expression cannot be statically resolved"
    ):
        cog_schema.read(broken)
