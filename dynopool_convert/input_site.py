"""A learnable input resolution: a DynOPool site in front of the model (``convert(input_site=True)``).

With it, "lower the input resolution" lies inside the search space: the site's scale factor
is the input's, and fitting a budget by one common factor on every group's ``r`` includes
shrinking the input. The pass inserts a call of ``input_resize`` (an identity marker) after
the model's image input; the site handler below turns it into DynOPool(``mean``) at stride 1,
and ``apply_plan`` replays the insertion from the plan's policy.
"""
from __future__ import annotations

from torch import Tensor, fx

from .sites import Candidate, _retarget_to_pool

__all__ = ["input_resize", "insert_input_site", "InputSiteHandler", "INPUT_SITE"]

INPUT_SITE = "input_resize"


def input_resize(x: Tensor) -> Tensor:
    """Identity marker for the input site (replaced by a DynOPool when the site is converted)."""
    return x


def insert_input_site(gm: fx.GraphModule) -> None:
    """Insert ``input_resize`` after the first placeholder (the image) of ``gm``, in place."""
    image = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    if image is None:
        return
    users = list(image.users)
    with gm.graph.inserting_after(image):
        node = gm.graph.call_function(input_resize, (image,))
    node.name = INPUT_SITE
    for user in users:
        user.replace_input_with(image, node)
    gm.recompile()


class InputSiteHandler:
    """The input site: starts at stride 1 (the original resolution), aggregates by mean."""

    name = "input_site"
    kind = "interpolate"

    def match(self, node: fx.Node, gm: fx.GraphModule) -> bool:
        return node.op == "call_function" and node.target is input_resize

    def inspect(self, node: fx.Node, gm: fx.GraphModule) -> Candidate:
        return Candidate(node.name, "", self.kind, "input resolution", self.name, stride=(1.0, 1.0), aggregate="mean")

    def apply(self, gm: fx.GraphModule, node: fx.Node, pool_path: str, placement: str) -> None:
        _retarget_to_pool(gm, node, pool_path)
