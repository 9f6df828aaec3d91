"""Bad input is refused before any work: exit code 2, one line in the interface's own terms (CLI
flags on the command line, argument names in the API), no traceback, nothing on disk.

Each case names what a user typed and the words the message must hold; the folder the command
was pointed at must not exist afterwards.
"""

import json
import math
import shutil

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxmask
from ports import api
from ports.errors import for_cli
from tests.ports.clitools import IN_PROCESS_BATCH, generate_args, invoke

LONG = "a " * 80  # pushes what follows past the text encoder's 77 tokens

GENERATE_CASES = {
    # name: (flags replacing / added to the good ones, or a prompts-file line; message words)
    "steps above the scheduler's 1000": (["--steps", "1001"], ["--steps", "[1, 1000]", "1001"]),
    "steps 100000": (["--steps", "100000"], ["--steps", "[1, 1000]"]),
    "class words the tokenizer lacks": (["--classes", "猫,🐱"], ["猫", "vocabulary"]),
    "dtype float64": (["--dtype", "float64"], ["--dtype", "float32, bfloat16, float16"]),
    "dtype nosuch": (["--dtype", "nosuch"], ["--dtype", "float32"]),
    "negative guidance": (["--guidance", "-1"], ["--guidance", ">= 0"]),
    "guidance nan": (["--guidance", "nan"], ["--guidance", "finite"]),
    "scheduler nosuch": (["--scheduler", "nosuch"], ["nosuch", "ddim"]),
    "format nosuch": (["--format", "zip"], ["--format", "voc, webdataset"]),
    "val fraction 1": (["--val-fraction", "1"], ["--val-fraction", "[0, 1)"]),
    "min area 2": (["--min-area", "2"], ["--min-area", "[0, 1]"]),
    "min confidence 2": (["--min-confidence", "2"], ["--min-confidence", "[0, 1]"]),
    "min area above max area": (
        ["--min-area", "0.5", "--max-area", "0.1"],
        ["--min-area 0.5 must be below --max-area 0.1"],
    ),
    "num-processes without a coordinator": (
        ["--num-processes", "2"],
        ["--coordinator", "--process-id"],
    ),
    "process id outside the count": (
        ["--num-processes", "2", "--process-id", "2", "--coordinator", "localhost:1"],
        ["--process-id", "[0, 1]"],
    ),
    "seed 2**64+1": (["--seed", str(2**64 + 1)], ["--seed", "4294967295"]),
    "seed 2**32 (would repeat seed 0)": (["--seed", str(2**32)], ["--seed", "32 bits"]),
    "per-class 10**12": (["-n", str(10**12)], ["--per-class", "10,000,000"]),
    "size beyond memory": (
        ["--size", "65536", "--param", "seed_resolution=8192"],
        ["GiB", "--batch-size or --size"],
    ),
    "class file /dev/null": (["--classes", "@/dev/null"], ["/dev/null", "not a regular file"]),
    "beta=2": (["--param", "beta=2"], ["--param beta=2", "[0, 1]"]),
    "beta=nan": (["--param", "beta=nan"], ["--param beta=nan", "finite number"]),
    "beta=true": (["--param", "beta=true"], ["--param beta=true", "finite number"]),
    "seed_rule=nosuch": (["--param", "seed_rule=nosuch"], ["seed_rule", "otsu_squared"]),
    "beta=abc": (["--param", "beta=abc"], ["--param beta=abc", "finite number"]),
    "param without =": (["--param", "beta"], ["NAME=VALUE"]),
    "unknown param": (["--param", "gamma=1"], ["gamma", "beta"]),
    "param the model cannot take": (["--param", "seed_resolution=32"], ["32", "16"]),
    "unknown method": (["--method", "maskclip"], ["seediff-code", "ca"]),
    "coco preset": (["--classes", "coco"], ["preset", "voc"]),
    "template without {class}": (["--template", "a photo"], ["{class}", "e.g."]),
    "zero per class": (["-n", "0"], ["at least 1"]),
    "size the UNet cannot take": (["--size", "50"], ["multiple of", "64"]),
    "model folder missing": (["--model", "/nonexistent/sd"], ["/nonexistent/sd", "Hub id"]),
    "prompts: classes a string": (
        {"prompt": "a photo of a cat", "classes": "cat"},
        ["'classes' must be a non-empty list", ":1:"],
    ),
    "prompts: prompt a number": ({"prompt": 5, "classes": ["cat"]}, ["'prompt' must be", "5"]),
    "prompts: no classes": ({"prompt": "a photo of a cat", "classes": []}, ["non-empty list"]),
    "prompts: not an object": ("[1, 2]", ["JSON object with 'prompt' and 'classes'"]),
    "prompts: class word after token 77": (
        {"prompt": LONG + "cat", "classes": ["cat"]},
        ["truncated", "'cat'", "shorten the prompt"],
    ),
    "prompts: substring class (cats for cat)": (
        {"prompt": "a photo of cats", "classes": ["cat"]},
        ["a photo of cats", "'cat' does not occur"],
    ),
    "prompts: class word missing (kitten for cat)": (
        {"prompt": "a photo of a kitten", "classes": ["cat"]},
        ["kitten", "cat"],
    ),
}


# --param hands the method config the raw string where it is no number or name it knows; the
# config's own check names the flag, but jaxtyping's runtime check would refuse the str first.
_RAW_STRING = pytest.mark.unchecked("the method config's own message for a str where a float is")


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=_RAW_STRING)
        if c in ("beta=nan", "beta=abc", "seed_rule=nosuch")
        else c
        for c in GENERATE_CASES
    ],
)
def test_generate_refuses_before_any_work(case, tiny_sd_path, tmp_path):
    changes, words = GENERATE_CASES[case]
    out = tmp_path / "out"
    args = generate_args(out, tiny_sd_path, batch_size=IN_PROCESS_BATCH)
    if not isinstance(changes, list):  # a prompts-file line
        prompts = tmp_path / "prompts.jsonl"
        line = changes if isinstance(changes, str) else json.dumps(changes, ensure_ascii=False)
        prompts.write_text(line + "\n")
        changes = ["--prompts", str(prompts)]
    for flag, value in zip(changes[::2], changes[1::2], strict=True):
        if flag in args and flag != "--param":
            at = args.index(flag)
            del args[at : at + 2]
        args += [flag, value]
    code, output = invoke(*args)
    assert code == 2, output
    assert output.startswith("error: ") and output.count("\n") == 1, output
    assert "Traceback" not in output and "=True" not in output, output  # CLI terms
    for word in words:
        assert word in output, (word, output)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["prompts.jsonl"])


def test_damaged_weights_are_named_not_traced(tiny_sd_path, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_sd_path, model)
    weights = next((model / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a cut download
    out = tmp_path / "out"
    code, output = invoke(*generate_args(out, model, batch_size=IN_PROCESS_BATCH))
    assert code == 2, output
    assert str(weights) in output and "damaged or truncated" in output, output
    assert not out.exists()
    sheet = tmp_path / "sheet.png"
    code, output = invoke("sheet", "a photo of a cat", "-c", "cat", "--model", model, "-o", sheet)
    assert code == 2 and "damaged or truncated" in output, output
    assert not sheet.exists()


def test_sheet_into_a_folder_is_refused_and_leaves_nothing(tmp_path):
    code, output = invoke("sheet", "-o", tmp_path, "--steps", "1")
    assert code == 2 and "is a folder" in output and "sheet.png" in output, output
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The API names its arguments


@pytest.fixture(scope="module")
def pipe(tiny_sd_path):
    return api.load(tiny_sd_path)


API_CASES = {
    "method=42": (dict(method=42), TypeError, ["method", "42", "seediff-code"]),
    "pamr='yes'": (dict(pamr="yes"), TypeError, ["pamr", "'yes'", "PAMRConfig"]),
    "key=0.5": (dict(key=0.5), TypeError, ["key", "0.5", "jax.random.key"]),
    "key=2**40": (dict(key=2**40), ValueError, ["key", "4294967295"]),
    "steps=1001": (dict(steps=1001), ValueError, ["steps", "[1, 1000]"]),
    "steps=2.5": (dict(steps=2.5), ValueError, ["steps", "2.5"]),
    "guidance=-1": (dict(guidance=-1.0), ValueError, ["guidance", ">= 0"]),
    "scheduler='nosuch'": (dict(scheduler="nosuch"), ValueError, ["nosuch", "ddim"]),
    "class the tokenizer lacks": (dict(classes=["猫"]), ValueError, ["猫", "vocabulary"]),
    "beta=2 in a config": (
        dict(method=("seediff-code", dict(beta=2.0))),
        ValueError,
        ["beta", "[0, 1]"],
    ),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_refuses_with_argument_names(case, pipe):
    changes, kind, words = API_CASES[case]
    kwargs = dict(key=0, classes=["cat"], steps=2, method="ca")
    if isinstance(changes.get("method"), tuple):
        name, overrides = changes.pop("method")
        with pytest.raises(kind) as caught:
            jaxmask.methods.get(name, **overrides)
    else:
        kwargs.update(changes)
        key = kwargs.pop("key")
        with pytest.raises(kind) as caught:
            pipe.generate("a photo of a cat", key, **kwargs)
    message = str(caught.value)
    for word in words:
        assert word in message, (word, message)
    assert "--" not in message, message  # API terms, not flags


def test_api_size_beyond_memory_is_refused_before_compiling(pipe):
    before = pipe.sampler.cache_size()
    with pytest.raises(ValueError) as caught:
        pipe.generate("a photo of a cat", 0, classes=["cat"], method="ca", steps=2, height=65536)
    assert "GiB" in str(caught.value) and "batch size or the image size" in str(caught.value)
    assert "--size" in for_cli(caught.value)
    assert pipe.sampler.cache_size() == before


def test_memory_estimate_grows_with_the_attention_it_counts(pipe):
    """The estimate's attention term: 2 CFG branches x heads x n^2 tokens at the finest side."""
    sampler, size = pipe.sampler, pipe.native_size
    one, two = sampler.memory_estimate(1, size), sampler.memory_estimate(2, size)
    layout = pipe.layout(size)
    top = max(layout.sides)
    itemsize = np.dtype(np.float32).itemsize
    assert two - one == 2 * layout.heads_at(top) * top**4 * itemsize
    doubled = sampler.memory_estimate(1, 2 * size) - sampler.memory_estimate(0, 2 * size)
    assert math.isclose(doubled, 16 * (one - sampler.memory_estimate(0, size)))


def test_seeds_at_or_above_2_32_alias_smaller_ones():
    """Why seeds stop at 2**32: JAX's default key keeps 32 bits of the seed."""
    same = jax.random.key_data(jax.random.key(2**32)) == jax.random.key_data(jax.random.key(0))
    assert bool(np.all(same)) == (not jax.config.jax_enable_x64)


# ---------------------------------------------------------------------------------------------
# Fuzz: whatever a prompts file or a --param holds, the answer is a message, never a traceback

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
LINE = st.one_of(
    JSON.map(json.dumps),
    st.fixed_dictionaries({"prompt": JSON, "classes": JSON}).map(json.dumps),
    st.fixed_dictionaries(
        {"prompt": st.text(max_size=30), "classes": st.lists(st.sampled_from(["cat", "dog", ""]))}
    ).map(json.dumps),
    st.text(max_size=40),
)
# A last flag that is always refused: a line or a --param that passes every check meets it, so
# no example starts a model (and each stays fast).
SENTINEL = ["--dtype", "nosuch"]


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(lines=st.lists(LINE, min_size=1, max_size=3))
def test_fuzzed_prompts_files_get_a_message(lines, tmp_path):
    prompts = tmp_path / "fuzz.jsonl"
    prompts.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    out = tmp_path / "out"
    code, output = invoke(
        "generate", "-o", out, "--classes", "cat,dog", "-n", "1", "--prompts", prompts, *SENTINEL
    )
    assert code == 2 and output.startswith("error: ") and "Traceback" not in output, output
    assert not out.exists()


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=st.sampled_from(["seediff-code", "seediff-paper", "ca", "ca_sa"]),
    name=st.sampled_from(["beta", "alpha", "power", "seed_rule", "resolutions", "ignore_threshold"])
    | st.text(max_size=8),
    value=st.one_of(JSON.map(json.dumps), st.text(max_size=12)),
)
def test_fuzzed_params_get_a_message(method, name, value, tmp_path):
    out = tmp_path / "out"
    code, output = invoke(
        "generate",
        "-o",
        out,
        "-n",
        "1",
        "--method",
        method,
        "--param",
        f"{name}={value}",
        *SENTINEL,
    )
    assert code == 2 and output.startswith("error: ") and "Traceback" not in output, output
    assert not out.exists()
