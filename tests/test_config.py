import dataclasses

import pytest
import torch
from transformers import HfArgumentParser

from qdrop_hf import QDropConfig, QDropConfigError, RuntimeConfig, UnsupportedModelError, quantize_model
from qdrop_hf.config import REFERENCE_SWITCHES
from qdrop_hf.batches import CalibrationDataError


@pytest.mark.parametrize("field,value", [("n_bits_w", 1), ("n_bits_w", 9), ("n_bits_a", 1), ("n_bits_a", 9),
                                         ("prob", 0.0), ("input_prob", 0.0), ("prob", 1.5), ("order", "sideways"),
                                         ("iters_w", -1), ("num_samples", 0), ("init_amode", "guess"),
                                         ("b_end", 0.5), ("bias_correction", "all"),
                                         ("depthwise_range", "mse"), ("input_drop", "fp")])
def test_invalid_configs_are_refused_with_the_field_named(field, value):
    with pytest.raises(QDropConfigError, match=field):
        QDropConfig(**{field: value})


def test_empty_calibration_set_is_refused():
    from conftest import tiny_bert

    with pytest.raises(CalibrationDataError, match="empty"):
        quantize_model(tiny_bert(), [], QDropConfig(iters_w=0))


def test_unsupported_model_names_supported_types_and_how_to_add():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(UnsupportedModelError, match="bert.*register_family"):
        quantize_model(model, [torch.randn(2, 4)], QDropConfig(iters_w=0))


def test_config_round_trips_through_dict():
    config = QDropConfig(n_bits_w=2, prob=0.7, order="after")
    assert QDropConfig.from_dict(config.to_dict()) == config
    with pytest.raises(QDropConfigError, match="unknown"):
        QDropConfig.from_dict({"n_bits": 4})


@pytest.mark.parametrize("field,value", [("cache_dir", "/nonexistent/qdrop-cache"), ("channels_last", "yes"),
                                         ("micro_batch_size", 0), ("cache_dtype", "int8")])
def test_invalid_runtime_settings_are_refused_with_the_field_named(field, value):
    with pytest.raises(QDropConfigError, match=f"runtime setting: {field}"):
        RuntimeConfig(**{field: value})


def test_runtime_settings_are_not_method_settings():
    """Where and how a run computes (device, kernels, caches) is not saved with the model: a saved
    config naming a scratch directory would not load where that directory does not exist."""
    method = {f.name for f in dataclasses.fields(QDropConfig)}
    runtime = {f.name for f in dataclasses.fields(RuntimeConfig)}
    assert not method & runtime
    assert {"device", "compile", "cache_dir", "micro_batch_size", "channels_last"} <= runtime


def parsed(*argv):
    from qdrop_hf.tasks.cli import parse_args

    return parse_args(QDropConfig, RuntimeConfig, argv=list(argv))


def test_command_line_defaults_are_the_python_defaults():
    config, runtime = parsed()
    assert config == QDropConfig() and runtime == RuntimeConfig()
    help_texts = {a.dest: a.help for a in HfArgumentParser((QDropConfig,))._actions}
    assert all(help_texts[f.name] for f in dataclasses.fields(QDropConfig)), "every field has its help text"


@pytest.mark.parametrize("argv,on", [
    # the reference implementation's lines: the switches named are on, the others off
    (["--channel_wise", "--act_quant", "--order", "after", "--wwq", "--awq", "--aaq"],
     {"channel_wise", "act_quant", "wwq", "awq", "aaq"}),
    (["--channel_wise", "--act_quant", "--order", "before", "--wwq", "--waq", "--aaq"],
     {"channel_wise", "act_quant", "wwq", "waq", "aaq"}),
    (["--n_bits_w", "2", "--channel_wise"], {"channel_wise"}),
    # no switch as a bare flag: the defaults, with explicit values applied
    (["--n_bits_w", "2"], set(REFERENCE_SWITCHES)),
    (["--wwq", "false"], set(REFERENCE_SWITCHES) - {"wwq"}),
    (["--no_act_quant"], set(REFERENCE_SWITCHES) - {"act_quant"}),
])
def test_reference_style_switches(argv, on):
    config, _ = parsed(*argv)
    assert {name for name in REFERENCE_SWITCHES if getattr(config, name)} == on


def test_runtime_flags_keep_their_names():
    config, runtime = parsed("--device", "cpu", "--micro_batch_size", "4", "--channels_last", "false", "--compile")
    assert runtime == RuntimeConfig(device="cpu", micro_batch_size=4, channels_last=False, compile=True)
    assert config == QDropConfig()


def test_adaround_learning_rate_fits_the_iteration_budget_unless_given():
    assert QDropConfig(iters_w=20000).rounding_lr == pytest.approx(2.5e-3)
    assert QDropConfig(iters_w=5000).rounding_lr == pytest.approx(1e-2)
    assert QDropConfig(iters_w=500).rounding_lr == pytest.approx(0.1)
    assert QDropConfig(iters_w=50).rounding_lr == pytest.approx(0.1)  # capped
    assert QDropConfig(iters_w=200000).rounding_lr == pytest.approx(1e-3)  # floored
    assert QDropConfig(iters_w=500, round_lr=1e-3).rounding_lr == 1e-3
