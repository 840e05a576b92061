"""The suite turns warnings from the package's own code into errors (pyproject's
filterwarnings); warnings that third-party code raises on its own behalf stay warnings."""
import warnings

import pytest


@pytest.mark.parametrize("category", [DeprecationWarning, RuntimeWarning, UserWarning])
def test_warnings_from_the_package_are_errors(category):
    with pytest.raises(category):
        warnings.warn_explicit("from the package", category, "layer.py", 1,
                               module="zeromoe_cupy.layer")


def test_deprecations_in_a_test_body_are_errors():
    with pytest.raises(DeprecationWarning):
        warnings.warn("a deprecated call in a test", DeprecationWarning)


def test_third_party_warnings_stay_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit("their own", DeprecationWarning, "x.py", 1, module="numba.core.x")
    assert len(caught) == 1
