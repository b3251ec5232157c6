"""The Python API a user scripts against: exported names, keyword-only options, and docstrings that name every
parameter (numpydoc sections, as scikit-image documents its functions)."""

from __future__ import annotations

import inspect
import re

import dinofeat_client
from dinofeat_client import SETS, FeatureClient, FeatureComputation

COMPUTING = ("fetch_features", "segment", "train", "apply", "analyse", "few_shot")
POSITIONAL = {"fetch_features": ["image", "output", "computation"], "segment": ["image", "labels", "output", "computation"],
              "train": ["images", "labels", "output", "computation"], "apply": ["model", "image", "output"],
              "analyse": ["image", "analysis", "output", "computation"],
              "few_shot": ["supports", "masks", "query", "output", "computation"]}


def documented_parameters(docstring: str) -> set[str]:
    """The names a numpydoc Parameters section documents ("tls_ca, tls_cert, tls_key : str" names three)."""
    section = docstring.split("Parameters\n")[1].split("Returns\n")[0].split("Examples\n")[0]
    names = set()
    for line in section.splitlines():
        match = re.match(r"^\s*(\*\*\w+|[\w, ]+?)(?: : .*)?$", line)
        if match and line.strip() and not line.strip().startswith("-") and (" : " in line or line.strip().startswith("**")):
            names.update(name.strip().lstrip("*") for name in match.group(1).split(","))
    return names


def test_the_package_exports_the_client_the_computation_and_the_sets():
    assert set(dinofeat_client.__all__) >= {"FeatureClient", "FeatureComputation", "SETS", "__version__"}
    assert FeatureComputation().feature_set == "multiscale"
    assert [s.name for s in SETS][:3] == ["multiscale", "classical", "ilastik"]


def test_only_the_essentials_are_positional():
    for name, positional in POSITIONAL.items():
        parameters = list(inspect.signature(getattr(FeatureClient, name)).parameters.values())[1:]
        assert [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD] == positional, name
        assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in parameters[len(positional):]), name
    options = list(inspect.signature(FeatureClient.__init__).parameters.values())[2:]
    assert all(p.kind is p.KEYWORD_ONLY for p in options)


def test_every_parameter_of_a_computing_method_is_documented_with_a_returns_section():
    for name in COMPUTING:
        method = getattr(FeatureClient, name)
        parameters = set(inspect.signature(method).parameters) - {"self"}
        assert documented_parameters(method.__doc__) == parameters, name
        assert "Returns\n" in method.__doc__, name


def test_the_clients_constructor_documents_every_parameter():
    parameters = set(inspect.signature(FeatureClient.__init__).parameters) - {"self"}
    assert documented_parameters(FeatureClient.__doc__) == parameters


def test_forest_defaults_are_stated_not_encoded_as_zero():
    assert inspect.signature(FeatureClient.segment).parameters["trees"].default == 200
    assert inspect.signature(FeatureClient.few_shot).parameters["window"].default == 4
