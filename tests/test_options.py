"""qcow2.options: one table of -o options and qemu-img's messages for create, measure,
convert and amend (each command keeps qemu-img's own wording where qemu-img's differ)."""

from __future__ import annotations

import pytest

import qcow2
from qcow2 import options as O
from qcow2.errors import ImageTooLargeError, InvalidOptionError, UnsupportedFeatureError


def test_compat_words_per_command():
    assert O.compat_version("v2") == O.compat_version("0.10") == 2
    assert O.compat_version("v3") == O.compat_version("1.1") == 3
    # qemu-img names the QAPI member behind compat
    with pytest.raises(InvalidOptionError, match=r"^Parameter 'version' does not accept value "
                                                 r"'2'$"):
        O.compat_version("2")
    # measure: qcow2_opt_get_version_del knows the numbers only
    with pytest.raises(InvalidOptionError, match=r"^Invalid compatibility level: 'v3'$"):
        O.compat_version("v3", O.MEASURE_COMPAT_LEVELS, qapi=False)
    with pytest.raises(InvalidOptionError, match="Invalid compatibility level: '1.1'"):
        O.compat_version(1.1, O.MEASURE_COMPAT_LEVELS, qapi=False)


def test_v3_messages_name_the_fix_of_each_command():
    assert str(O.needs_v3("lazy_refcounts")) == (
        "Lazy refcounts only supported with compatibility level 1.1 and above "
        "(use version=v3 or greater)")
    assert str(O.needs_v3("lazy_refcounts", hint="compat=1.1")).endswith(
        "(use compat=1.1 or greater)")
    with pytest.raises(InvalidOptionError, match="may not exceed 64 bits"):
        O.check_refcount_bits(3, 3)
    with pytest.raises(InvalidOptionError, match=r"1.1 or above \(use compat=1.1 or greater"):
        O.check_refcount_bits(8, 2, hint="compat=1.1")
    O.check_refcount_bits(16, 2)


def test_preallocation_messages():
    with pytest.raises(InvalidOptionError,
                       match=r"^Parameter 'preallocation' does not accept value 'x'$"):
        O.check_preallocation("x")
    with pytest.raises(InvalidOptionError, match=r"^Parameter 'preallocation' does not accept"):
        O.check_preallocation("x", O.RAW_PREALLOC)
    O.check_preallocation("metadata")
    with pytest.raises(InvalidOptionError):
        O.check_preallocation("metadata", O.RAW_PREALLOC)
    with pytest.raises(InvalidOptionError, match=r"^invalid parameter value: x$"):
        O.check_preallocation("x", qapi=False)


def test_parse_options_names_and_types():
    got = O.parse_options({"cluster_size": "64k", "lazy_refcounts": "yes", "refcount_bits": "8",
                           "compat": "1.1", "size": None}, O.QCOW2_OPTIONS)
    assert got == {"cluster_size": 65536, "lazy_refcounts": True, "refcount_bits": 8,
                   "compat": "1.1"}
    with pytest.raises(InvalidOptionError, match="^Invalid parameter 'foo'$"):
        O.parse_options({"foo": 1}, O.QCOW2_OPTIONS)
    with pytest.raises(UnsupportedFeatureError, match="encrypt.format"):
        O.parse_options({"encrypt.format": "luks"}, O.QCOW2_OPTIONS,
                        O.create_option_error("qcow2"))
    with pytest.raises(InvalidOptionError, match="^Invalid parameter 'encrypt.format'$"):
        O.parse_options({"encrypt.format": "luks"}, O.RAW_OPTIONS, O.create_option_error("raw"))
    with pytest.raises(InvalidOptionError, match="expects a string"):
        O.parse_options({"compat": 1.1}, O.QCOW2_OPTIONS)
    assert O.parse_options({"compat": 1.1}, O.QCOW2_OPTIONS, strict_strings=False) == {
        "compat": 1.1}
    assert O.shown_value("lazy_refcounts", "yes", True) == "yes"
    assert O.shown_value("lazy_refcounts", True, True) == "on"
    assert O.shown_value("backing_file", "a,b", "a,b") == "a,,b"


def test_measure_and_create_share_the_messages(tmp_path):
    """The same check, through both commands: create's and measure's wording."""
    with pytest.raises(InvalidOptionError) as c:
        qcow2.create(tmp_path / "x.qcow2", "1M", compat="0.10", refcount_bits=8)
    with pytest.raises(InvalidOptionError) as m:
        qcow2.measure(size="1M", options={"compat": "0.10", "refcount_bits": 8})
    assert str(c.value).endswith("(use version=v3 or greater)")
    assert str(m.value).endswith("(use compat=1.1 or greater)")
    with pytest.raises(InvalidOptionError, match="^Invalid parameter 'foo'. Invalid options "
                                                 "for file format 'qcow2'$"):
        qcow2.measure(size="1M", options={"foo": "1"})
    with pytest.raises(InvalidOptionError, match="^Invalid parameter 'foo'$"):
        qcow2.create(tmp_path / "x.qcow2", "1M", foo="1")


def test_amend_names_and_too_large():
    O.check_amend_names({"compat": "1.1", "size": "1G"})
    # qemu-img 7.2: a creation-only option is an unknown parameter, with a hint
    with pytest.raises(InvalidOptionError, match="^Invalid parameter 'cluster_size'$") as e:
        O.check_amend_names({"cluster_size": "4k"})
    assert e.value.hint == "This option is only supported for image creation\n"
    with pytest.raises(UnsupportedFeatureError, match="data-file-raw cannot be set"):
        O.check_amend_names({"data_file_raw": "on"})
    with pytest.raises(InvalidOptionError, match="Invalid parameter 'foo'"):
        O.check_amend_names({"foo": 1})
    assert str(O.too_large(None, True)) == ("The image size is too large (try using a larger "
                                            "cluster size)")
    err = O.too_large("qcow2", False, "File too large")
    assert isinstance(err, ImageTooLargeError)
    assert str(err) == "The image size is too large for file format 'qcow2': File too large"


def test_option_dict():
    assert O.option_dict(None) == {}
    assert O.option_dict("a=b,,c,d") == {"a": "b,c", "d": "on"}
    src = {"x": 1}
    assert O.option_dict(src) == src and O.option_dict(src) is not src
