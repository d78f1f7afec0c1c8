"""transfer-export: ONNX, TorchScript and torch.export models give PyTorch's probabilities on real images."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import MOBILENET, TINY, case_config, write_image_folder
from tests.test_configs import run_cli
from tests.test_images import sideways_photo
from transfer_cases import asset_path
from transfer_cases.commands.export import FORMATS, main
from transfer_cases.commands.export_usage import usage
from transfer_cases.data import ImageFolderDataModule
from transfer_cases.data.sources import open_image
from transfer_cases.data.transforms import eval_transform
from transfer_cases.training.checkpoint import load_module
from transfer_cases.training.module import TransferModule
from transfer_cases.training.preprocess import Preprocess

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

HYMENOPTERA = asset_path("hymenoptera")
# Real photos of both classes, in their original sizes (portrait and landscape).
IMAGES = [
    *sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[:2],
    sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[0],
]
Reference = tuple[TransferModule, torch.Tensor, np.ndarray]
TOLERANCE = 1e-4  # max abs difference of probabilities, exported vs PyTorch
# Every format for the tiny CNN; MobileNetV2 (224 px) in ONNX, the deployment path, in the fast suite,
# its PyTorch formats (tracing and running TorchScript take ~10 s here) in `make test-all`.
CASES = [
    *[("tiny", fmt) for fmt in FORMATS],
    # The embedded MobileNetV2 in every format: make test-all (the tiny body covers each path here).
    *[pytest.param("mobilenet", fmt, marks=pytest.mark.slow) for fmt in ("onnx", "torchscript", "exported")],
]


def save(module: TransferModule, path: Path, trainer: L.Trainer | None = None) -> Path:
    if trainer is None:
        trainer = L.Trainer(logger=False, max_epochs=0, enable_progress_bar=False, enable_model_summary=False)
        trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def trained_tiny(tmp: Path) -> Path:
    """A tiny CNN with a cut, partly frozen body, trained one epoch on synthetic images."""
    module = TransferModule(
        backbone=TINY, case=case_config("small_different"), num_classes=3, class_names=["r", "g", "b"]
    )
    data = write_image_folder(tmp / "images", classes=("r", "g", "b"))
    dm = ImageFolderDataModule(data, batch_size=6, preprocess=module.preprocess, image_size=32)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        default_root_dir=tmp,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, dm)
    return save(module, tmp / "tiny.ckpt", trainer)


def embedded_mobilenet(tmp: Path) -> Path:
    """The embedded MobileNetV2, frozen, with a head fitted on 16 training images and then tempered.

    With a random head the logits are tiny and so is any difference that export makes to them; a
    fitted head saturates the softmax (1.0 / 0.0), which hides differences too. Dividing the fitted
    head by a temperature (largest logit gap on the training images: 4) keeps the probabilities
    between the two, where the parity check sees what export does to the features.
    """
    module = TransferModule(
        backbone=MOBILENET, case=case_config("small_similar"), num_classes=2, class_names=["ants", "bees"]
    ).eval()
    transform = eval_transform(module.preprocess)
    files = [p for c in ("ants", "bees") for p in sorted((HYMENOPTERA / "train" / c).glob("*.jpg"))[:8]]
    with torch.no_grad():
        features = module.backbone(torch.stack([transform(Image.open(p)) for p in files]))
    labels = torch.tensor([0] * 8 + [1] * 8)
    optimizer = torch.optim.Adam(module.head.parameters(), lr=0.01)
    for _ in range(20):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module.head(features), labels).backward()
        optimizer.step()
    with torch.no_grad():
        logits = module.head(features)
        gap = (logits[:, 1] - logits[:, 0]).abs().max()
        for p in module.head.parameters():  # a linear head: scaling weight and bias scales the logits
            p.mul_(4 / gap)
    return save(module, tmp / "mobilenet.ckpt")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`"tiny" | "mobilenet" -> checkpoint`, each made once per module (and only when a test needs it)."""
    tmp = tmp_path_factory.mktemp("ckpts")
    cache: dict[str, Path] = {}

    def get(model: str) -> Path:
        if model not in cache:
            cache[model] = trained_tiny(tmp) if model == "tiny" else embedded_mobilenet(tmp)
        return cache[model]

    return get


@pytest.fixture(scope="module")
def exported(checkpoint: Callable[[str], Path]) -> Callable[[str, str], tuple[Path, str]]:
    """`(model, format) -> (exported file, stdout of transfer-export)`, each exported once per module.

    The tiny model is exported next to its checkpoint (the default), MobileNetV2 into `--out <folder>/`.
    """
    cache: dict[tuple[str, str], tuple[Path, str]] = {}

    def get(model: str, fmt: str) -> tuple[Path, str]:
        if (model, fmt) not in cache:
            ckpt = checkpoint(model)
            out = [] if model == "tiny" else ["--out", f"{ckpt.parent / 'deploy'}/"]
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                main([str(ckpt), "--format", fmt, *out])
            folder = ckpt.parent if model == "tiny" else ckpt.parent / "deploy"
            cache[model, fmt] = (folder / f"{ckpt.stem}{FORMATS[fmt]}", stdout.getvalue())
        return cache[model, fmt]

    return get


def load_exported(path: Path, fmt: str) -> tuple[Callable[[torch.Tensor], np.ndarray], dict]:
    """The exported model as `batch -> probabilities`, and the metadata stored inside its file."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["image"]
        assert [o.name for o in session.get_outputs()] == ["probabilities"]
        meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
        return lambda x: session.run(["probabilities"], {"image": x.numpy()})[0], meta
    extra = {"metadata.json": ""}
    if fmt == "torchscript":
        model = torch.jit.load(str(path), _extra_files=extra)
    else:
        model = torch.export.load(str(path), extra_files=extra).module()
    return lambda x: model(x).detach().numpy(), json.loads(extra["metadata.json"])


@pytest.fixture(scope="module")
def reference(
    checkpoint: Callable[[str], Path],
) -> Callable[[str], Reference]:
    """`model -> (module, the real images as its validation transform feeds them, PyTorch's output)`."""
    cache: dict[str, Reference] = {}

    def get(model: str) -> Reference:
        if model not in cache:
            module = load_module(checkpoint(model))
            transform = eval_transform(module.preprocess)
            x = torch.stack([transform(Image.open(p)) for p in IMAGES])
            with torch.no_grad():
                cache[model] = module, x, module(x).softmax(dim=1).numpy()
        return cache[model]

    return get


def check_usage_snippet(stdout: str, fmt: str, class_names: list[str], expected: np.ndarray) -> None:
    """The snippet runs as printed; its PIL + numpy preprocessing matches the validation transform."""
    snippet = stdout.split("usage", 1)[1].split("\n", 1)[1]
    if fmt == "onnx":  # deployable without torch
        assert "torch" not in snippet and "transfer_cases" not in snippet
    code = compile(snippet.replace('"image.jpg"', json.dumps(str(IMAGES[0]))), "snippet", "exec")
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(code, namespace)
    assert printed.getvalue().split()[0] == class_names[int(expected[0].argmax())]
    assert np.abs(namespace["probs"] - expected[0]).max() <= TOLERANCE
    # The other images (landscape and portrait) through the snippet's own functions.
    for image, want in zip(IMAGES[1:], expected[1:], strict=True):
        probs = namespace["run"](namespace["preprocess"](str(image)))[0]
        assert np.abs(probs - want).max() <= TOLERANCE


@pytest.mark.parametrize(("model", "fmt"), CASES)
def test_exported_model_and_its_usage_snippet_give_pytorch_probabilities(
    exported: Callable[[str, str], tuple[Path, str]],
    reference: Callable[[str], Reference],
    checkpoint: Callable[[str], Path],
    model: str,
    fmt: str,
) -> None:
    path, stdout = exported(model, fmt)
    assert f"wrote {path}" in stdout
    module, x, expected = reference(model)
    run, meta = load_exported(path, fmt)
    probs = run(x)  # batch 3
    assert probs.shape == (3, len(module.class_names))
    assert np.abs(probs - expected).max() <= TOLERANCE
    assert np.abs(run(x[1:2]) - expected[1:2]).max() <= TOLERANCE  # batch 1: the batch size is dynamic
    if model == "mobilenet":  # neither flat nor saturated: see embedded_mobilenet
        assert 0.6 < expected.max() < 0.99
    # Class names and preprocessing travel inside the file and in the side JSON.
    side = json.loads(Path(f"{path}.json").read_text())
    assert meta == side
    assert side["format"] == fmt and side["class_names"] == module.class_names
    assert side["preprocess"] == module.preprocess.to_dict()
    assert set(side["preprocess"]) == {"resize_size", "crop_size", "mean", "std"}
    assert side["case"] == module.case.name and side["backbone"] == module.backbone.name
    assert side["source_checkpoint"] == str(checkpoint(model).resolve())
    assert side["input"]["shape"] == ["batch", 3, module.preprocess.crop_size, module.preprocess.crop_size]
    check_usage_snippet(stdout, fmt, module.class_names, expected)


def test_onnx_model_has_a_dynamic_batch_and_opset_17_or_later(
    exported: Callable[[str, str], tuple[Path, str]],
) -> None:
    import onnx

    path, _ = exported("tiny", "onnx")
    proto = onnx.load(str(path))
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (image,) = proto.graph.input
    assert image.type.tensor_type.shape.dim[0].dim_param  # symbolic, not a fixed number
    assert [d.dim_value for d in image.type.tensor_type.shape.dim[1:]] == [3, 32, 32]
    assert {p.key for p in proto.metadata_props} >= {"class_names", "preprocess", "case", "backbone"}


def test_default_output_is_next_to_the_checkpoint(
    exported: Callable[[str, str], tuple[Path, str]], checkpoint: Callable[[str], Path]
) -> None:
    path, _ = exported("tiny", "torchscript")
    assert path == checkpoint("tiny").with_suffix(".pt") and path.is_file()
    assert Path(f"{path}.json").is_file()


# -- errors: one message, exit status 2, no traceback --------------------------------------------------
def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_missing_checkpoint_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_main([str(tmp_path / "none.ckpt"), "--format", "torchscript"], capsys)
    assert "checkpoint not found" in err and "none.ckpt" in err


def test_unwritable_output_folder_is_a_clean_error(
    checkpoint: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    err = run_main([str(checkpoint("tiny")), "--format", "exported", "--out", f"{blocker}/m.pt2"], capsys)
    assert f"{blocker} is a file, not a folder" in err


def test_unknown_format_is_refused_by_the_parser(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_main([str(tmp_path / "x.ckpt"), "--format", "tflite"], capsys)
    assert "invalid choice: 'tflite'" in err


def test_onnx_without_the_extra_names_the_install_command(
    checkpoint: Callable[[str], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if it were not installed
    err = run_main([str(checkpoint("tiny")), "--format", "onnx", "--out", str(tmp_path / "m.onnx")], capsys)
    assert 'pip install -e ".[export]"' in err and "onnxscript" in err
    assert not (tmp_path / "m.onnx").exists()


def _fake_onnxruntime(info: dict[str, Any], inputs: list[np.ndarray]) -> ModuleType:
    """An `onnxruntime` whose session holds `info` as metadata and records what it is given."""

    class Session:
        def __init__(self, path: str, providers: list[str]) -> None:
            pass

        def get_modelmeta(self) -> SimpleNamespace:
            return SimpleNamespace(custom_metadata_map={k: json.dumps(v) for k, v in info.items()})

        def run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            inputs.append(feed["image"])
            return [np.array([[0.25, 0.75]], np.float32)]

    return SimpleNamespace(InferenceSession=Session)  # type: ignore[return-value]


def _grey16(path: Path) -> Path:
    """A 16-bit grey PNG spanning 0..65535: PIL's convert("RGB") would clip it to mostly white."""
    ramp = np.linspace(0, 65535, 48 * 40).reshape(40, 48).astype(np.uint16)
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    return path


def _palette_with_transparency(path: Path) -> Path:
    img = Image.new("P", (30, 50))
    img.putpalette([0, 0, 0, 250, 10, 10, 10, 250, 10] + [0] * 759)
    img.paste(1, (0, 0, 15, 50))
    img.paste(2, (15, 0, 30, 25))
    img.save(path, transparency=0)
    return path


@pytest.mark.parametrize(
    "make",
    [
        _grey16,
        _palette_with_transparency,
        lambda p: Image.open(IMAGES[0]).convert("LA").save(p) or p,
        lambda p: Image.open(IMAGES[1]).save(p) or p,
        lambda p: sideways_photo(p.with_suffix(".jpg")) and p.with_suffix(".jpg"),
    ],
    ids=["grey16", "palette-transparent", "grey-alpha", "rgb", "exif-sideways"],
)
def test_onnx_snippet_preprocesses_like_the_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: Callable[[Path], Path]
) -> None:
    """The printed snippet's array is the validation transform's on the image as training reads it
    (`open_image`: upright by its EXIF orientation), whatever the image mode."""
    image = make(tmp_path / "image.png")
    prep = Preprocess(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resize_size=36, crop_size=32)
    inputs: list[np.ndarray] = []
    info = {"preprocess": prep.to_dict(), "class_names": ["dark", "light"]}
    monkeypatch.setitem(sys.modules, "onnxruntime", _fake_onnxruntime(info, inputs))
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(usage("onnx", tmp_path / "m.onnx", str(image)), "snippet", "exec"), {})
    assert printed.getvalue().split()[0] == "light"
    (x,) = inputs
    expected = eval_transform(prep)(open_image(image, str(image))).numpy()[None]
    assert x.shape == expected.shape == (1, 3, 32, 32) and x.dtype == np.float32
    np.testing.assert_allclose(x, expected, atol=1e-5)


def test_docs_onnx_snippet_is_what_the_command_prints() -> None:
    readme = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    onnx = [b for b in blocks if "import onnxruntime as ort" in b]
    assert onnx == [usage("onnx", "epoch04.onnx", "bee.jpg")]


# -- the file's suffix and the format agree ----------------------------------------------------------
@pytest.mark.parametrize(
    ("fmt", "name", "named"),
    [
        ("torchscript", "model.onnx", "onnx"),
        ("onnx", "model.pt", "torchscript"),
        ("exported", "m.pt", "torchscript"),
    ],
)
def test_a_suffix_of_another_format_is_refused(
    checkpoint: Callable[[str], Path], tmp_path: Path, fmt: str, name: str, named: str
) -> None:
    """`--format torchscript --out model.onnx` wrote TorchScript under an ONNX name without a word."""
    out = tmp_path / name
    run = run_cli(
        "transfer-export", str(checkpoint("tiny")), "--format", fmt, "--out", str(out), cwd=tmp_path
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    (line,) = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    right = out.with_suffix(FORMATS[fmt]).name
    assert f"--out {out} ends in {out.suffix}, the suffix of the {named} format, but --format {fmt}" in line
    assert f"name the file {right} (or pass --format {named}" in line
    assert not out.exists() and not list(tmp_path.glob("*.json"))


def test_without_format_the_suffix_chooses_it(checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    out = tmp_path / "model.pt2"
    run = run_cli("transfer-export", str(checkpoint("tiny")), "--out", str(out), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"wrote {out} (exported," in run.stdout
    assert json.loads(Path(f"{out}.json").read_text())["format"] == "exported"
    torch.export.load(out)  # a torch.export program, not an ONNX file under a .pt2 name
