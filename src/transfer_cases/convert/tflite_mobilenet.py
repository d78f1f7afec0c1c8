"""Convert the Coral/TensorFlow uint8 MobileNetV2 (TF-Lite) into a plain torchvision `mobilenet_v2`.

The TF-Lite file stores each conv with its BatchNorm already folded in (weights and a bias), so the
conversion puts the dequantized weights into torchvision's convs and makes every BatchNorm an
identity plus that bias. Eval mode is then exact, but train-mode BatchNorm would renormalise with
batch statistics the network never had and wreck the features as soon as anyone fine-tunes it.
`reestimate_batchnorm` gives each BatchNorm the statistics of its real input while keeping the
eval-mode function unchanged, so both modes agree.

Regenerate the shipped asset with `python -m transfer_cases.convert.tflite_mobilenet` (`make weights`).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tflite
import torch
import torchvision
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms import v2
from tqdm import tqdm

from transfer_cases.backbones.weights_file import save_weights_file
from transfer_cases.utils.paths import PACKAGE_DIR, asset_path

# the shared data folder next to a checkout (`../shared/data`, where `make weights` looks)
SHARED_DIR = PACKAGE_DIR.parents[2] / "shared" / "data" / "imagenet_mobilenet_tflite"
TFLITE_NAME = "mobilenet_v2_1.0_224_quant.tflite"
SOURCE = (
    f"{TFLITE_NAME} from github.com/google-coral/test_data "
    "(commit 104342d2d3480b3e66203073dac24f4e2dbb4c41), Apache-2.0; uint8 quantization-aware-trained "
    "ImageNet classifier, dequantized by transfer_cases.convert.tflite_mobilenet"
)
MEAN = STD = (0.5, 0.5, 0.5)  # TF-Lite input: scale 1/128, zero point 128, i.e. [-1, 1]
RESIZE_SIZE, CROP_SIZE = 256, 224
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}

_CONV_OPS = {tflite.BuiltinOperator.CONV_2D, tflite.BuiltinOperator.DEPTHWISE_CONV_2D}
_NP_DTYPES = {
    tflite.TensorType.UINT8: np.uint8,
    tflite.TensorType.INT8: np.int8,
    tflite.TensorType.INT32: np.int32,
}


def _dequantized(model: tflite.Model, graph: tflite.SubGraph, index: int) -> np.ndarray:
    """A constant tensor as float32: (q - zero_point) * scale, per tensor or per `QuantizedDimension`."""
    tensor = graph.Tensors(index)
    shape = tuple(int(d) for d in tensor.ShapeAsNumpy())
    q = model.Buffers(tensor.Buffer()).DataAsNumpy().view(_NP_DTYPES[tensor.Type()]).reshape(shape)
    quant = tensor.Quantization()
    scale, zero_point = quant.ScaleAsNumpy(), quant.ZeroPointAsNumpy()
    if scale.size > 1:  # per-channel: broadcast along the quantized axis
        axis_shape = [1] * len(shape)
        axis_shape[quant.QuantizedDimension()] = -1
        scale, zero_point = scale.reshape(axis_shape), zero_point.reshape(axis_shape)
    return ((q.astype(np.float64) - zero_point) * scale).astype(np.float32)


def _read_convs(path: Path) -> list[tuple[Tensor, Tensor]]:
    """(OIHW weight, bias) of every conv in graph order; depthwise kernels come back as O1HW."""
    model = tflite.Model.GetRootAsModel(path.read_bytes(), 0)
    graph = model.Subgraphs(0)
    convs = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        # newer files keep the opcode in BuiltinCode, older ones only in DeprecatedBuiltinCode
        opcode = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if opcode not in _CONV_OPS:
            continue
        weight = _dequantized(model, graph, op.Inputs(1))
        bias = _dequantized(model, graph, op.Inputs(2))
        # TF-Lite kernels are OHWI, depthwise ones 1HWO; torch wants OIHW and O1HW
        depthwise = opcode == tflite.BuiltinOperator.DEPTHWISE_CONV_2D
        weight = weight.transpose((3, 0, 1, 2) if depthwise else (0, 3, 1, 2))
        convs.append((torch.from_numpy(np.ascontiguousarray(weight)), torch.from_numpy(bias)))
    return convs


def set_identity_batchnorm(bn: nn.BatchNorm2d, bias: Tensor) -> None:
    """Make `bn` compute `x + bias` in eval mode: where a conv carries an already-folded BatchNorm."""
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.bias.copy_(bias)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)  # sqrt(var + eps) == 1


def convert_tflite_mobilenet_v2(path: str | Path) -> nn.Module:
    """A torchvision `mobilenet_v2` (1000 classes) with the TF-Lite weights, its BatchNorm fit for eval only.

    The 1001-way TF logits start with a 'background' class; dropping it leaves ImageNet-1k in
    torchvision's order. Padding stays torchvision's symmetric one (TF pads stride-2 convs
    bottom/right only), so the result is a plain torchvision model at the cost of rare top-1 flips.
    """
    convs = _read_convs(Path(path))
    model = torchvision.models.mobilenet_v2()
    targets = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.features.modules() if isinstance(m, nn.BatchNorm2d)]
    if len(convs) != len(targets) + 1:
        raise ValueError(f"{path}: {len(convs)} convs, expected {len(targets) + 1} for MobileNetV2 1.0")
    # in torchvision's mobilenet_v2 each conv is directly followed by its BatchNorm, in registration order
    for (weight, bias), conv, bn in zip(convs[:-1], targets, bns, strict=True):
        if weight.shape != conv.weight.shape:
            raise ValueError(f"{path}: conv weight {tuple(weight.shape)} != {tuple(conv.weight.shape)}")
        with torch.no_grad():
            conv.weight.copy_(weight)
        set_identity_batchnorm(bn, bias)
    logits_weight, logits_bias = convs[-1]
    linear = model.classifier[1]
    with torch.no_grad():
        linear.weight.copy_(logits_weight[1:].flatten(1))
        linear.bias.copy_(logits_bias[1:])
    return model.eval()


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, images: Iterable[Tensor]) -> None:
    """Give every BatchNorm2d the real statistics of its input while keeping the eval-mode function.

    Statistics are gathered in eval mode, where each BN's input is exactly what the deployed network
    computes, so one pass serves all layers. With input mean m and variance v, and the eval-mode map
    x -> s*x + o, the layer becomes running_mean=m, running_var=v, weight=s*sqrt(v+eps), bias=o+s*m:
    eval mode computes s*x + o as before, and train mode, whose batch statistics are close to m and v,
    computes nearly the same. `images` yields (N, C, H, W) batches or single (C, H, W) images.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if any(not bn.affine or bn.running_mean is None for bn in bns):
        raise ValueError("reestimate_batchnorm needs affine BatchNorm2d layers that track running stats")
    # per layer: pixel count, mean and sum of squared deviations, merged batch by batch (Chan et al.)
    stats: dict[nn.BatchNorm2d, list] = {bn: [0, 0.0, 0.0] for bn in bns}

    def collect(bn: nn.BatchNorm2d, args: tuple[Tensor, ...]) -> None:
        x = args[0]
        n_b = x.numel() // x.shape[1]
        var_b, mean_b = (t.double() for t in torch.var_mean(x, dim=(0, 2, 3), correction=0))
        m2_b = var_b * n_b
        n, mean, m2 = stats[bn]
        delta = mean_b - mean
        total = n + n_b
        stats[bn] = [total, mean + delta * n_b / total, m2 + m2_b + delta**2 * n * n_b / total]

    was_training = model.training
    model.eval()
    handles = [bn.register_forward_pre_hook(collect) for bn in bns]
    try:
        for batch in images:
            model(batch if batch.dim() == 4 else batch.unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for bn, (n, mean, m2) in stats.items():
        if n == 0:
            raise ValueError("reestimate_batchnorm saw no images")
        var = m2 / n  # biased, as train-mode BatchNorm normalises with it
        scale = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
        offset = bn.bias.double() - scale * bn.running_mean.double()
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_(scale * (var + bn.eps).sqrt())
        bn.bias.copy_(offset + scale * mean)


def preprocess() -> v2.Compose:
    """The evaluation transform the converted weights expect: resize, centre crop, [-1, 1] range."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Resize(RESIZE_SIZE),
            v2.CenterCrop(CROP_SIZE),
            v2.Normalize(MEAN, STD),
        ]
    )


def load_images(paths: Sequence[Path]) -> Tensor:
    """The images at `paths`, preprocessed into one (N, 3, 224, 224) tensor."""
    transform = preprocess()
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


@torch.no_grad()
def eval_and_train_logits(
    model: nn.Module, images: Tensor, batch_size: int = 32, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Logits of `model` in eval mode and with train-mode BatchNorm, both in the order of `images`.

    Train mode runs on a copy, so the model's running statistics stay as they are, and only the
    BatchNorm layers switch: dropout sits in the ImageNet head, which fine-tuning replaces anyway.
    The train-mode batches are shuffled like a training loader's, because a batch drawn from one
    class has statistics that no training batch has.
    """
    model.eval()
    probe = copy.deepcopy(model)
    for bn in (m for m in probe.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.train()
    eval_logits = torch.cat([model(batch) for batch in images.split(batch_size)])
    train_logits = torch.empty_like(eval_logits)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    for idx in order.split(batch_size):
        train_logits[idx] = probe(images[idx])
    return eval_logits, train_logits


def _top1_agreement(a: Tensor, b: Tensor) -> float:
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


def read_categories(labels: Path) -> list[str]:
    """The 1000 ImageNet class names from the 1001-line TF label file (line 0 is 'background')."""
    lines = [line.strip() for line in labels.read_text().splitlines()]
    if len(lines) != 1001 or lines[0] != "background":
        raise ValueError(f"{labels}: expected 1001 lines starting with 'background'")
    return lines[1:]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tflite", type=Path, default=SHARED_DIR / TFLITE_NAME)
    parser.add_argument("--labels", type=Path, default=SHARED_DIR / "imagenet_labels.txt")
    parser.add_argument(
        "--calib-dir",
        type=Path,
        default=asset_path("hymenoptera/train"),
        help="natural images for BatchNorm statistics (searched recursively); never a validation split",
    )
    parser.add_argument("--out", type=Path, default=asset_path("mobilenet_v2_imagenet.pt"))
    args = parser.parse_args(argv)

    categories = read_categories(args.labels)
    calib = sorted(p for p in args.calib_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not calib:
        raise SystemExit(f"no images under {args.calib_dir}")
    model = convert_tflite_mobilenet_v2(args.tflite)
    images = load_images(calib)
    eval_before, train_before = eval_and_train_logits(model, images)
    reestimate_batchnorm(model, tqdm(images.split(32), desc="BatchNorm statistics", unit="batch"))
    eval_after, train_after = eval_and_train_logits(model, images)

    meta = {
        "mean": list(MEAN),
        "std": list(STD),
        "resize_size": RESIZE_SIZE,
        "crop_size": CROP_SIZE,
        "categories": categories,
        "source": SOURCE,
        "bn_reestimated_on": (
            f"{args.calib_dir.parent.name}/{args.calib_dir.name} ({len(calib)} images, Resize {RESIZE_SIZE}"
            f" + CenterCrop {CROP_SIZE}): BatchNorm input statistics in eval mode; eval outputs unchanged"
        ),
    }
    save_weights_file(args.out, model.state_dict(), arch="mobilenet_v2", meta=meta, half=True)
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 2**20:.2f} MiB)\n"
        f"calibration images: {len(calib)} from {args.calib_dir}\n"
        "top-1 agreement of train-mode BatchNorm (shuffled batches of 32) with eval mode: "
        f"before {_top1_agreement(train_before, eval_before):.1%}, "
        f"after {_top1_agreement(train_after, eval_after):.1%}\n"
        f"eval mode after vs before: top-1 identical on {_top1_agreement(eval_after, eval_before):.1%}, "
        f"max |logit diff| {(eval_after - eval_before).abs().max().item():.2e}"
    )


if __name__ == "__main__":
    main()
