"""Spec overrides of `kubectl ckpt resume|restart`: -f (a merge patch of the spec) and --set (one field)."""

import pytest

from ckpt_operator.overrides import OverrideError, apply_overrides, load_override_file, parse_path, set_path

SPEC = {"template": {"spec": {"containers": [{"name": "trainer", "command": ["python", "t.py", "--steps", "40"],
                                              "env": [{"name": "LR", "value": "0.1"}]}]}},
        "checkpoint": {"persistentVolumeClaim": {"claimName": "c"}}, "backoffLimit": 3}


def test_paths_index_lists_and_escape_dots():
    assert parse_path("template.spec.containers[0].env[1].value") == [
        "template", "spec", "containers", 0, "env", 1, "value"]
    assert parse_path(r"template.spec.containers[0].resources.limits.nvidia\.com/gpu") == [
        "template", "spec", "containers", 0, "resources", "limits", "nvidia.com/gpu"]


def test_set_changes_one_field_of_a_copy():
    changed = set_path(SPEC, "template.spec.containers[0].env[0].value", "0.01")
    assert changed["template"]["spec"]["containers"][0]["env"] == [{"name": "LR", "value": "0.01"}]
    assert SPEC["template"]["spec"]["containers"][0]["env"][0]["value"] == "0.1"  # never mutated
    gpu = set_path(SPEC, r"template.spec.containers[0].resources.limits.nvidia\.com/gpu", 2)
    assert gpu["template"]["spec"]["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": 2}}


@pytest.mark.parametrize("path", ["template.spec.containers[3].image", "template.spec.nolist[0].x",
                                  "backoffLimit.deeper", "template..spec"])
def test_bad_paths_are_clear_errors(path):
    with pytest.raises(OverrideError, match="--set"):
        set_path(SPEC, path, 1)


def test_files_merge_then_sets_apply_and_the_changes_are_described():
    spec, changes = apply_overrides(SPEC, ["spec:\n  backoffLimit: 5\n  suspend: null\n"],
                                    ['template.spec.containers[0].command[3]="80"'])
    assert spec["backoffLimit"] == 5 and spec["template"]["spec"]["containers"][0]["command"][3] == "80"
    assert changes == {"backoffLimit": 5, "suspend": None, "template.spec.containers[0].command[3]": "80"}
    assert load_override_file("backoffLimit: 2") == {"backoffLimit": 2}  # `spec:` is optional
    with pytest.raises(OverrideError):
        load_override_file("- a list")
    with pytest.raises(OverrideError, match="path=value"):
        apply_overrides(SPEC, [], ["no-equals-sign"])
