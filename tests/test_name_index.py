"""Tests for melanoma_dist.data.name_index: compact file-name lookups for large label files."""

from melanoma_dist.data.name_index import Mentions, NameIndex
from melanoma_dist.data.records import CHUNK_ROWS


def test_name_index_finds_names_case_insensitively_as_a_dict_would():
    names = ["ISIC_0000001.JPG", "notes.txt", "a.jpg", "A.jpg", "c\udcff.png"] + [f"x{i}.jpg" for i in range(CHUNK_ROWS)]
    index = NameIndex(names)
    as_dict = {n.lower(): n for n in names}
    assert len(index) == len(names) and sorted(index) == sorted(names)
    for lower in ["isic_0000001.jpg", "a.jpg", "c\udcff.png", "x7.jpg", f"x{CHUNK_ROWS - 1}.jpg"]:
        assert index.get(lower) == as_dict[lower]
    assert index.get("A.jpg") is None  # asked lower-cased, as the finder does
    assert index.get("missing.jpg") is None and NameIndex([]).get("a.jpg") is None


def test_mentions_by_id_or_file_name():
    mentions = Mentions()
    for name in ["ISIC_0000001", "Other.JPG"]:
        mentions.add(name)
    stems, files = ["isic_0000001", "other", "loose"], ["isic_0000001.png", "other.jpg", "loose.jpg"]
    assert mentions.contains_any(stems, files).tolist() == [True, True, False]
    mentions.add("LOOSE")
    assert mentions.contains_any(stems, files).tolist() == [True, True, True]
