"""A timm model whose fixed patch grid stops every move (Eva's rotary table) is converted again
with ``dynamic_img_size=True`` when its builder takes it: a learned group, the same outputs, the
build argument recorded so that the checkpoint rebuilds it, and a note that says so."""
from __future__ import annotations

import torch

import dynopool_convert as dc
from dynopool_convert.conversion import convert_source

SOURCE, ARGS, SIZE = "timm:eva02_tiny_patch14_224", {"img_size": 56, "depth": 2, "num_classes": 5}, (3, 56, 56)


def test_a_fixed_grid_is_converted_again_with_any_grid_and_stays_exact(tmp_path):
    torch.manual_seed(0)
    original = dc.build_model(SOURCE, ARGS).eval()
    torch.save(original.state_dict(), tmp_path / "w.pt")
    done = convert_source(SOURCE, dict(ARGS), input_size=SIZE, weights=tmp_path / "w.pt")
    assert done.plan.summary()["groups"] == 1 and done.build_args["dynamic_img_size"] is True
    assert any("dynamic_img_size=True" in note for note in done.plan.notes)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.equal(done.model.eval()(x), original(x))  # placement exact: the original's outputs
    saved = dc.save_checkpoint(tmp_path / "c.pt", done.model, done.plan, done.source, done.build_args,
                               input_size=done.input_size, extra=done.extra)
    assert dc.load_checkpoint(saved).build_args["dynamic_img_size"] is True


def test_a_grid_the_user_fixed_is_kept():
    done = convert_source(SOURCE, {**ARGS, "dynamic_img_size": False}, input_size=SIZE)
    assert done.plan.summary()["groups"] == 0 and done.build_args["dynamic_img_size"] is False
    assert not any("dynamic_img_size" in note for note in done.plan.notes)


def test_a_swin_with_fixed_windows_is_built_again_where_that_learns_more_groups():
    """A Swin built for one size precomputes its shifted windows' masks: only some groups learn
    as built; with any grid, each stage's patch merging learns too."""
    args = {"img_size": 64, "embed_dim": 8, "depths": (2, 2, 2, 2), "num_heads": (1, 1, 1, 1), "window_size": 4,
            "num_classes": 3}
    done = convert_source("timm:swin_tiny_patch4_window7_224", dict(args), input_size=(3, 64, 64))
    assert done.plan.summary()["groups"] == 4 and done.build_args["dynamic_img_size"] is True
    assert any(note.startswith("2 learned groups as built") and "4 built again with dynamic_img_size=True" in note
               for note in done.plan.notes)
