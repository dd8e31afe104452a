import pickle
import shutil
import socket

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from evpretrain.config import ConfigError
from evpretrain.data.config import DemoConfig
from evpretrain.data.demo import build_demo
from evpretrain.data.store import EventStore, EventStoreWriter, StoreError
from evpretrain.events.contract import EVENT_DTYPE
from evpretrain.teachers import (
    Teacher,
    TeacherFeatures,
    compute_teacher_features,
    create_teacher,
    frame_to_image,
    list_teachers,
    resize_tokens,
)
from evpretrain.teachers.clip import load_visual_state_dict
from evpretrain.teachers.efficientnet import packaged_weights_path, timm_state_dict

IMAGENET_EGYPTIAN_CAT, IMAGENET_ESPRESSO = 285, 967


class PatchMeanTeacher(Teacher):
    """A tiny stand-in teacher: 16x16 input, each token the mean colour of a 4x4 patch (grid 4x4, D = 3)."""

    name = "patch_mean"

    def __init__(self, fail_on_call: int | None = None):
        super().__init__(input_size=(16, 16), grid_size=(4, 4), embed_dim=3, mean=(0.0,) * 3, std=(1.0,) * 3)
        self.fail_on_call, self.calls = fail_on_call, 0
        self.freeze()

    def encode(self, images):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("teacher failed")
        return F.avg_pool2d(images, 4).flatten(2).transpose(1, 2)


def natural_image(name: str) -> torch.Tensor:
    import skimage.data

    return torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1)[None].float() / 255.0


@pytest.fixture(scope="module")
def lite0():
    return create_teacher("efficientnet_lite0")


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    config = DemoConfig(samples={"train": 4}, image_size=48, digit_size=20, num_frames=4)
    return build_demo(config, tmp_path_factory.mktemp("demo"), workers=1, progress=False)["train"]


# --- registry --------------------------------------------------------------------------------------------------


def test_registry_lists_both_teachers_and_rejects_unknown_names():
    from evpretrain.pretrain.config import TEACHERS

    assert {"efficientnet_lite0", "clip_vit_b16"} <= set(list_teachers())
    assert list(TEACHERS) == list_teachers()  # the torch-free names the plan checks pretrain.teacher.name against
    with pytest.raises(ConfigError, match=r"unknown teacher 'dino'; known teachers: clip_vit_b16, efficientnet_lite0"):
        create_teacher("dino")
    with pytest.raises(TypeError, match="colour"):
        create_teacher("efficientnet_lite0", colour="red")


# --- efficientnet_lite0 ----------------------------------------------------------------------------------------


def test_efficientnet_lite0_weights_are_real_imagenet_weights(lite0):
    # Photos that scikit-image ships: a tabby cat and a cup of espresso.
    for image, expected in (("chelsea", IMAGENET_EGYPTIAN_CAT), ("coffee", IMAGENET_ESPRESSO)):
        probabilities = lite0.classify(natural_image(image)).softmax(-1)[0]
        assert int(probabilities.argmax()) == expected, image
        assert float(probabilities[expected]) > 0.5, image


def test_efficientnet_lite0_key_map_covers_every_tensor_with_its_shape(lite0):
    package_state = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    mapped = timm_state_dict(package_state, lite0.model)
    expected = lite0.model.state_dict()
    assert len(mapped) == len(package_state) == len(expected)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    for key, value in mapped.items():
        torch.testing.assert_close(expected[key], value, rtol=0, atol=0)


def test_efficientnet_lite0_tokens_are_the_last_feature_map_in_row_major_order(lite0):
    images = torch.rand(2, 3, 100, 150)
    tokens = lite0(images)
    assert lite0.input_size == (224, 224) and lite0.grid_size == (7, 7) and lite0.embed_dim == 1280
    assert tokens.shape == (2, 49, 1280)
    with torch.no_grad():
        feature_map = lite0.model.forward_features(lite0.preprocess(images))  # (2, 1280, 7, 7), after BN + ReLU6
    torch.testing.assert_close(tokens[:, 3 * 7 + 5], feature_map[:, :, 3, 5])
    assert float(tokens.min()) >= 0.0 and float(tokens.max()) <= 6.0


def test_efficientnet_lite0_uses_the_tensorflow_lite_normalisation(lite0):
    # Trained on (pixel - 127) / 128: mid-grey is zero, black -1, white +1.
    grey_levels = torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1, 1).expand(3, 3, 224, 224)
    expected = torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1, 1).expand(3, 3, 224, 224)
    torch.testing.assert_close(lite0.preprocess(grey_levels), expected)


def test_teacher_stays_frozen_in_train_mode(lite0):
    assert not any(p.requires_grad for p in lite0.parameters())
    container = torch.nn.Sequential(lite0)
    container.train()
    assert not lite0.training and not lite0.model.bn2.training
    running_mean = lite0.model.bn2.running_mean.clone()
    lite0(torch.rand(2, 3, 224, 224))
    torch.testing.assert_close(lite0.model.bn2.running_mean, running_mean, rtol=0, atol=0)


def test_teacher_rejects_images_that_are_not_three_channel_float(lite0):
    with pytest.raises(ValueError, match=r"efficientnet_lite0: expected images \(B, 3, H, W\)"):
        lite0(torch.rand(2, 1, 224, 224))
    with pytest.raises(ValueError, match="torch.uint8"):
        lite0(torch.zeros(2, 3, 224, 224, dtype=torch.uint8))


def test_efficientnet_lite0_missing_weights_file_names_the_field(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=f"'weights' does not exist: {missing}"):
        create_teacher("efficientnet_lite0", weights=missing)


# --- clip_vit_b16 ----------------------------------------------------------------------------------------------


def _refuse_network(*args, **kwargs):
    raise AssertionError("the network was used")


@pytest.fixture(scope="module")
def clip_random(tmp_path_factory):
    """A randomly initialised CLIP ViT-B/16 visual tower saved as a full-CLIP checkpoint (keys ``visual.*`` plus
    text-tower keys that must be ignored), and the teacher built from it with the network disabled."""
    import open_clip

    generator = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        shapes = open_clip.CLIP(**open_clip.get_model_config("ViT-B-16-quickgelu")).visual.state_dict()
    # float16, as OpenAI ships its weights.
    visual = {k: (0.02 * torch.randn(v.shape, generator=generator)).half() for k, v in shapes.items()}
    state = {f"visual.{k}": v for k, v in visual.items()}
    state |= {"logit_scale": torch.tensor(4.6), "text_projection": torch.randn(512, 512)}
    path = tmp_path_factory.mktemp("clip") / "random-ViT-B-16.pt"
    torch.save(state, path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "create_connection", _refuse_network)
        patch.setattr(socket.socket, "connect", _refuse_network)
        teacher = create_teacher("clip_vit_b16", weights=str(path))
    return teacher, visual, path


def test_clip_returns_all_196_patch_tokens_projected_to_the_joint_space(clip_random):
    teacher, _, _ = clip_random
    assert teacher.input_size == (224, 224) and teacher.grid_size == (14, 14) and teacher.embed_dim == 512
    captured = []
    hook = teacher.visual.ln_post.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        tokens = teacher(torch.rand(1, 3, 48, 64))
    finally:
        hook.remove()
    assert tokens.shape == (1, 196, 512)
    # As the paper's code: ln_post over all 197 tokens, the class token dropped, every patch token times proj.
    (normalised,) = captured
    assert normalised.shape == (1, 197, 768)
    torch.testing.assert_close(tokens, normalised[:, 1:] @ teacher.visual.proj)


def test_clip_loads_the_given_weights_and_ignores_the_text_tower(clip_random):
    teacher, visual, _ = clip_random
    loaded = teacher.visual.state_dict()
    assert loaded.keys() == visual.keys()
    for key, value in visual.items():
        assert loaded[key].dtype == torch.float32
        torch.testing.assert_close(loaded[key], value.float(), rtol=0, atol=0)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_clip_without_weights_fails_clearly_and_never_downloads(monkeypatch, tmp_path):
    monkeypatch.setattr(socket, "create_connection", _refuse_network)
    monkeypatch.setattr(socket.socket, "connect", _refuse_network)
    with pytest.raises(
        ValueError, match="clip_vit_b16: no weights file.*config field 'weights'.*nothing is downloaded"
    ):
        create_teacher("clip_vit_b16")
    missing = tmp_path / "ViT-B-16.pt"
    with pytest.raises(FileNotFoundError, match=f"config field 'weights' does not exist: {missing}"):
        create_teacher("clip_vit_b16", weights=missing)


def test_clip_reports_missing_and_unexpected_keys(clip_random, tmp_path):
    _, _, path = clip_random
    state = torch.load(path, weights_only=True)
    state.pop("visual.proj")
    state["visual.extra.weight"] = torch.zeros(1)
    broken = tmp_path / "broken.pt"
    torch.save(state, broken)
    with pytest.raises(ValueError, match=r"missing \['proj'\], unexpected \['extra.weight'\]"):
        create_teacher("clip_vit_b16", weights=broken)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_load_visual_state_dict_reads_torchscript_safetensors_and_plain_files(tmp_path):
    from safetensors.torch import save_file

    class Clip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Linear(2, 3)
            self.token_embedding = torch.nn.Embedding(4, 2)

        def forward(self, x):
            return self.visual(x)

    model = Clip()
    expected = model.visual.state_dict()
    torch.jit.save(torch.jit.script(model), tmp_path / "openai.pt")  # how OpenAI ships its checkpoints
    save_file(model.state_dict(), tmp_path / "open_clip.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ddp.pt")
    torch.save(model.visual.state_dict(), tmp_path / "visual_only.pth")
    for name in ("openai.pt", "open_clip.safetensors", "ddp.pt", "visual_only.pth"):
        loaded = load_visual_state_dict(tmp_path / name)
        assert loaded.keys() == expected.keys(), name
        for key in expected:
            torch.testing.assert_close(loaded[key], expected[key], rtol=0, atol=0)


# --- resize_tokens ---------------------------------------------------------------------------------------------


def test_resize_tokens_keeps_row_major_positions():
    tokens = torch.zeros(1, 7 * 7, 2)
    tokens[0, 2 * 7 + 5, 0] = 1.0  # row 2, column 5
    tokens[0, 5 * 7 + 1, 1] = 1.0  # row 5, column 1
    grid = resize_tokens(tokens, (7, 7), (14, 14)).reshape(14, 14, 2)
    assert (grid[..., 0] == grid[..., 0].max()).nonzero().tolist() == [[4, 10], [4, 11], [5, 10], [5, 11]]
    assert (grid[..., 1] == grid[..., 1].max()).nonzero().tolist() == [[10, 2], [10, 3], [11, 2], [11, 3]]


def test_resize_tokens_interpolates_between_cell_centres():
    ramp = torch.tensor([0.0, 1.0]).repeat(2).view(1, 4, 1)  # 2x2 grid, value = column
    up = resize_tokens(ramp, (2, 2), (2, 4)).view(2, 4)
    torch.testing.assert_close(up, torch.tensor([0.0, 0.25, 0.75, 1.0]).expand(2, 4))
    assert resize_tokens(ramp, (2, 2), (2, 2)) is ramp


@settings(max_examples=30, deadline=None)
@given(
    src=st.tuples(st.integers(1, 9), st.integers(1, 9)),
    dst=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    half=st.booleans(),
    seed=st.integers(0, 99),
)
def test_resize_tokens_is_a_convex_combination(src, dst, half, seed):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(2, src[0] * src[1], 5, generator=generator)
    tokens = tokens.half() if half else tokens
    out = resize_tokens(tokens, src, dst)
    assert out.shape == (2, dst[0] * dst[1], 5) and out.dtype == tokens.dtype
    low, high = tokens.float().amin(1, keepdim=True), tokens.float().amax(1, keepdim=True)
    tolerance = 1e-2 if half else 1e-5
    assert bool(((out.float() >= low - tolerance) & (out.float() <= high + tolerance)).all())
    constant = torch.full((1, src[0] * src[1], 3), 0.7)
    torch.testing.assert_close(resize_tokens(constant, src, dst), torch.full((1, dst[0] * dst[1], 3), 0.7))


def test_resize_tokens_rejects_a_grid_that_does_not_match():
    with pytest.raises(ValueError, match=r"expected tokens \(B, 49, D\) for a 7x7 grid"):
        resize_tokens(torch.zeros(1, 50, 3), (7, 7), (4, 4))


# --- cached features -------------------------------------------------------------------------------------------


def test_frame_to_image_converts_float_and_uint8_frames():
    image = frame_to_image(np.array([[0, 255], [51, 102]], np.uint8))
    assert image.shape == (3, 2, 2) and image.dtype == torch.float32
    torch.testing.assert_close(image[1], torch.tensor([[0.0, 1.0], [0.2, 0.4]]))
    torch.testing.assert_close(frame_to_image(np.full((2, 3), 0.25, np.float32)), torch.full((3, 2, 3), 0.25))


def test_teacher_features_of_the_demo_store(lite0, demo_store, tmp_path):
    out = compute_teacher_features(
        demo_store, lite0, tmp_path / "lite0.h5", grid_size=(6, 6), batch_size=3, device="cpu", progress=False
    )
    with EventStore(demo_store) as store:
        last_frames = torch.stack([frame_to_image(store.dense("frames", i)[-1]) for i in range(len(store))])
        expected = resize_tokens(lite0(last_frames), (7, 7), (6, 6))
        sha = store.attrs["content_sha256"]
    with TeacherFeatures(out, store=demo_store) as features:
        assert len(features) == 4 and features.grid_size == (6, 6) and features.embed_dim == 1280
        assert features.teacher == "efficientnet_lite0"
        attrs = features.attrs
        assert attrs["source_content_sha256"] == sha and attrs["source_store"] == str(demo_store)
        assert attrs["teacher_grid"] == [7, 7] and attrs["grid"] == [6, 6]
        assert attrs["teacher_weights"] == str(packaged_weights_path())
        for i in range(4):
            assert features[i].shape == (36, 1280) and features[i].dtype == torch.float32
            torch.testing.assert_close(features[i], expected[i], rtol=2e-3, atol=2e-3)  # stored as float16
        torch.testing.assert_close(pickle.loads(pickle.dumps(features))[-1], features[3])
        with pytest.raises(IndexError):
            features[4]
    with h5py.File(out) as file:
        assert file["tokens"].dtype == np.float16 and file["tokens"].shape == (4, 36, 1280)
    assert [p.name for p in tmp_path.iterdir()] == ["lite0.h5"]  # no temporary file left


def test_teacher_features_refuse_another_store(demo_store, tmp_path):
    out = compute_teacher_features(
        demo_store, PatchMeanTeacher(), tmp_path / "f.h5", grid_size=(2, 2), batch_size=4, progress=False
    )
    other = tmp_path / "other.h5"
    shutil.copy(demo_store, other)
    with h5py.File(other, "a") as file:
        file.attrs["content_sha256"] = "0" * 64
    TeacherFeatures(out).check_source(demo_store)
    with pytest.raises(StoreError, match=f"{out}: computed from a store with content_sha256 .* but {other} has 0000"):
        TeacherFeatures(out, store=other)


def test_teacher_features_need_their_input_field(demo_store, tmp_path):
    store = tmp_path / "no_frames.h5"
    events = np.zeros(1, EVENT_DTYPE)
    events["p"] = 1
    with EventStoreWriter(store, sensor_size=(8, 8), source="test") as writer:
        writer.add_sample(events)
    with pytest.raises(StoreError, match=f"{store}: pretrain.teacher.input: last_frame needs the field 'frames'"):
        compute_teacher_features(store, PatchMeanTeacher(), tmp_path / "f.h5", grid_size=(2, 2), progress=False)
    with pytest.raises(StoreError, match="pretrain.teacher.input: rgb needs the field 'rgb'.*keep_rgb"):
        compute_teacher_features(
            demo_store, PatchMeanTeacher(), tmp_path / "f.h5", grid_size=(2, 2), progress=False, image="rgb"
        )
    assert not (tmp_path / "f.h5").exists()


def test_rgb_teacher_features_see_the_colour_source(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (3, 3, 16, 16), dtype=np.uint8)
    store = tmp_path / "rgb.h5"
    events = np.zeros(1, EVENT_DTYPE)
    events["p"] = 1
    with EventStoreWriter(store, sensor_size=(8, 8), source="test") as writer:
        for image in rgb:
            writer.add_sample(events, frames=np.zeros((2, 8, 8), np.uint8), rgb=image)
    out = compute_teacher_features(
        store, PatchMeanTeacher(), tmp_path / "f.h5", grid_size=(4, 4), batch_size=2, progress=False, image="rgb"
    )
    # PatchMeanTeacher's token: the mean colour of a 4x4 patch of the 16x16 image (no resize, identity normalisation).
    expected = rgb.astype(np.float64).reshape(3, 3, 4, 4, 4, 4).mean(axis=(3, 5)) / 255
    with TeacherFeatures(out, store=store, image="rgb") as features:
        assert features.image == "rgb" and features.attrs["input"] == "rgb"
        for i in range(3):
            np.testing.assert_allclose(features[i].numpy(), expected[i].reshape(3, 16).T, atol=1e-3)
    with pytest.raises(
        StoreError, match="teacher tokens of the input 'rgb', but pretrain.teacher.input is 'last_frame'"
    ):
        TeacherFeatures(out, image="last_frame")


def test_a_failed_run_leaves_the_previous_features_untouched(demo_store, tmp_path):
    out = tmp_path / "f.h5"
    out.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="teacher failed"):
        compute_teacher_features(
            demo_store, PatchMeanTeacher(fail_on_call=2), out, grid_size=(2, 2), batch_size=2, progress=False
        )
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["f.h5"]


def test_teacher_features_reject_a_file_of_another_kind(demo_store):
    with pytest.raises(StoreError, match="not a teacher-features file"):
        TeacherFeatures(demo_store)
