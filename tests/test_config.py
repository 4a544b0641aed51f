import pytest
import torch

from qdrop_hf import QDropConfig, QDropConfigError, UnsupportedModelError, quantize_model
from qdrop_hf.batches import CalibrationDataError


@pytest.mark.parametrize("field,value", [("n_bits_w", 1), ("n_bits_w", 9), ("n_bits_a", 1), ("n_bits_a", 9),
                                         ("prob", 0.0), ("input_prob", 0.0), ("prob", 1.5), ("order", "sideways"),
                                         ("iters_w", -1), ("num_samples", 0), ("init_amode", "guess"),
                                         ("cache_dir", "/nonexistent/qdrop-cache"), ("b_end", 0.5),
                                         ("bias_correction", "all"), ("channels_last", "yes"),
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


def test_a_scratch_cache_dir_is_not_saved_with_the_result(tmp_path):
    """``cache_dir`` is where one machine put temporary files: a saved config that named it would not
    load where that directory does not exist."""
    config = QDropConfig(cache_dir=str(tmp_path))
    assert "cache_dir" not in config.to_dict()
    assert QDropConfig.from_dict(config.to_dict()) == QDropConfig()


def test_adaround_learning_rate_fits_the_iteration_budget_unless_given():
    assert QDropConfig(iters_w=20000).rounding_lr == pytest.approx(2.5e-3)
    assert QDropConfig(iters_w=5000).rounding_lr == pytest.approx(1e-2)
    assert QDropConfig(iters_w=500).rounding_lr == pytest.approx(0.1)
    assert QDropConfig(iters_w=50).rounding_lr == pytest.approx(0.1)  # capped
    assert QDropConfig(iters_w=200000).rounding_lr == pytest.approx(1e-3)  # floored
    assert QDropConfig(iters_w=500, round_lr=1e-3).rounding_lr == 1e-3
