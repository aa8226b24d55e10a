"""Tests for melanoma_dist.labels."""

import pytest

from melanoma_dist.labels import (
    HAM7_CLASSES, check_provides, class_names, is_binary, melanoma_index, positive_class, to_class_index)

# (scheme, label_type, raw value, expected class index)
VALID_CASES = [
    ("ham7", "dx", "akiec", 0),
    ("ham7", "dx", "mel", 4),
    ("ham7", "dx", "Melanoma", 4),
    ("ham7", "dx", " nevus ", 5),
    ("ham7", "dx", "Naevus", 5),
    ("ham7", "dx", "melanocytic nevus", 5),
    ("ham7", "dx", "seborrheic_keratosis", 2),
    ("ham7", "dx", "Benign-Keratosis", 2),
    ("ham7", "dx", "basal_cell_carcinoma", 1),
    ("ham7", "dx", "actinic_keratosis", 0),
    ("ham7", "dx", "dermatofibroma", 3),
    ("ham7", "dx", "VASCULAR", 6),
    ("melanoma", "dx", "mel", 1),
    ("melanoma", "dx", "bcc", 0),
    ("melanoma", "dx", "nv", 0),
    ("malignant", "dx", "mel", 1),
    ("malignant", "dx", "bcc", 1),
    ("malignant", "dx", "akiec", 1),
    ("malignant", "dx", "bkl", 0),
    ("malignant", "dx", "nevus", 0),
    ("melanoma", "melanoma", "1", 1),
    ("melanoma", "melanoma", "0", 0),
    ("melanoma", "melanoma", 1, 1),
    ("melanoma", "melanoma", True, 1),
    ("melanoma", "melanoma", "false", 0),
    ("melanoma", "melanoma", "TRUE", 1),
    ("melanoma", "melanoma", "1.0", 1),
    ("melanoma", "melanoma", "melanoma", 1),
    ("melanoma", "melanoma", "Other", 0),
    ("malignant", "malignant", "malignant", 1),
    ("malignant", "malignant", "benign", 0),
    ("malignant", "malignant", "1", 1),
]

# (scheme, label_type, raw value, text the error must contain)
INVALID_CASES = [
    ("ham7", "dx", "banana", "unknown diagnosis 'banana'"),
    ("melanoma", "dx", "", "unknown diagnosis"),
    ("melanoma", "melanoma", "2", "unknown melanoma label '2'"),
    ("melanoma", "melanoma", "mel", "valid values: 0, 1, true, false, other, melanoma"),
    ("malignant", "malignant", "melanoma", "unknown malignant label"),
    ("ham7", "melanoma", "1", "cannot provide label scheme 'ham7'"),
]


def test_class_names_and_helpers():
    assert class_names("ham7") == HAM7_CLASSES == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert class_names("melanoma") == ("other", "melanoma")
    assert class_names("malignant") == ("benign", "malignant")
    assert [is_binary(s) for s in ("ham7", "melanoma", "malignant")] == [False, True, True]
    assert [positive_class(s) for s in ("ham7", "melanoma", "malignant")] == [None, "melanoma", "malignant"]
    assert [melanoma_index(s) for s in ("ham7", "melanoma", "malignant")] == [4, 1, None]


@pytest.mark.parametrize("scheme,label_type,raw,expected", VALID_CASES)
def test_to_class_index_valid(scheme, label_type, raw, expected):
    assert to_class_index(scheme, label_type, raw, where="x.csv line 2") == expected


@pytest.mark.parametrize("scheme,label_type,raw,message", INVALID_CASES)
def test_to_class_index_invalid_names_where_and_values(scheme, label_type, raw, message):
    with pytest.raises(ValueError, match="x.csv line 7") as e:
        to_class_index(scheme, label_type, raw, where="x.csv line 7")
    assert message in str(e.value)


@pytest.mark.parametrize("scheme,label_type,ok", [
    ("ham7", "dx", True), ("melanoma", "dx", True), ("malignant", "dx", True),
    ("melanoma", "melanoma", True), ("ham7", "melanoma", False), ("malignant", "melanoma", False),
    ("malignant", "malignant", True), ("melanoma", "malignant", False), ("ham7", "malignant", False),
])
def test_check_provides(scheme, label_type, ok):
    if ok:
        check_provides(scheme, label_type, "src")
    else:
        with pytest.raises(ValueError, match=f"source 'src' has {label_type} 0/1 labels and cannot provide "
                                             f"label scheme '{scheme}'; use label_scheme: {label_type}"):
            check_provides(scheme, label_type, "src")


def test_unknown_scheme_lists_valid_schemes():
    with pytest.raises(ValueError, match=r"unknown label scheme 'nope'; "
                                         r"valid schemes: \['ham7', 'melanoma', 'malignant'\]"):
        class_names("nope")


def test_unknown_label_type():
    with pytest.raises(ValueError, match="unknown label_type 'grade'"):
        check_provides("melanoma", "grade", "src")
