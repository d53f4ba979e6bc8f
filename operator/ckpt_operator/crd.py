"""Generates the TrainingJob CustomResourceDefinition from the pydantic models (hack/gen-crd.py writes it)."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from . import reasons as R
from .models import Phase, TrainingJobSpec, TrainingJobStatus

_DROP = {"title", "$defs"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """Inline $refs, turn Optional (anyOf with null) into the plain type, drop JSON-Schema-only keys."""
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _structural({**target, **extra}, defs)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) == 1:
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            return _structural({**options[0], **rest}, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or (key == "default" and value is None):
            continue
        if key == "default" and isinstance(value, dict):
            out[key] = {k: v for k, v in value.items() if v is not None}
        elif key == "properties":
            out[key] = {name: _structural(v, defs) for name, v in value.items()}
        else:
            out[key] = _structural(value, defs)
    if out.get("x-kubernetes-preserve-unknown-fields"):
        out.pop("additionalProperties", None)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def _schema(model: type[Any]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return dict(_structural(raw, raw.get("$defs", {})))


def schema() -> dict[str, Any]:
    """The openAPIV3Schema of the TrainingJob resource."""
    spec = _schema(TrainingJobSpec)
    status = _schema(TrainingJobStatus)
    # an integer or {min, max}: no structural type covers both, and CEL cannot see an untyped field, so the
    # operator validates it (TrainingJobSpec) and reports a bad value in status.message
    spec["properties"]["workers"] = {"x-kubernetes-preserve-unknown-fields": True,
                                     "description": spec["properties"]["workers"]["description"]}
    status["properties"]["phase"]["enum"] = [p.value for p in Phase]
    status["properties"]["conditions"].update({"x-kubernetes-list-type": "map",
                                               "x-kubernetes-list-map-keys": ["type"]})
    return {
        "type": "object",
        "description": "A training run that survives preemption: resubmitted after every preemption, resumed from "
                       "its newest complete checkpoint.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [{
            "rule": "self.metadata.name.size() <= 52",
            "message": "metadata.name must be at most 52 characters (pod names are <name>-<attempt>)",
        }],
    }


def crd() -> dict[str, Any]:
    columns = [
        ("Phase", "string", ".status.phase"),
        ("Attempt", "integer", ".status.attempt"),
        ("Preemptions", "integer", ".status.preemptions"),
        ("Failures", "integer", ".status.failures"),
        ("Checkpoint", "integer", ".status.lastCheckpoint.step"),
        ("Progress", "string", ".status.progress.display"),
        ("ETA", "string", ".status.progress.estimatedCompletionTime"),
        ("Goodput", "string", ".status.goodput.display"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{R.PLURAL}.{R.GROUP}", "labels": {"app.kubernetes.io/name": "ckpt-operator"}},
        "spec": {
            "group": R.GROUP,
            "scope": "Namespaced",
            "names": {"kind": R.KIND, "listKind": f"{R.KIND}List", "plural": R.PLURAL, "singular": "trainingjob",
                      "shortNames": ["tj"], "categories": ["all"]},
            "versions": [{
                "name": R.VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [{"name": n, "type": t, "jsonPath": p} for n, t, p in columns],
                "schema": {"openAPIV3Schema": schema()},
            }],
        },
    }


WORKERS = "object.spec.workers"
WORKERS_RULE = (
    f"!has({WORKERS}) || (type({WORKERS}) == int ? ({WORKERS} >= 1 && {WORKERS} <= 1024) : "
    f"(type({WORKERS}) == map && {WORKERS}.size() == 2 && 'min' in {WORKERS} && 'max' in {WORKERS} && "
    f"type({WORKERS}.min) == int && type({WORKERS}.max) == int && {WORKERS}.min >= 1 && "
    f"{WORKERS}.min <= {WORKERS}.max && {WORKERS}.max <= 1024))")
GANG_NAME_RULE = (f"!has({WORKERS}) || (type({WORKERS}) == int && {WORKERS} == 1) || "
                  "object.metadata.name.matches('^[a-z]')")


def validation_policy() -> list[dict[str, Any]]:
    """What the CRD's schema cannot say of `spec.workers` (an integer or {min, max}): a ValidatingAdmissionPolicy
    and its binding, so that `kubectl apply` refuses a bad value."""
    name = f"{R.PLURAL}.{R.GROUP}-workers"
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "ckpt-operator"}},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{"apiGroups": [R.GROUP], "apiVersions": ["*"],
                                                    "operations": ["CREATE", "UPDATE"], "resources": [R.PLURAL]}]},
            "validations": [
                {"expression": WORKERS_RULE,
                 "message": "spec.workers is a count (1-1024) or {min: M, max: N} with 1 <= M <= N <= 1024"},
                {"expression": GANG_NAME_RULE,
                 "message": "a gang (workers > 1, or {min, max}) needs a metadata.name that starts with a letter: "
                            "it names the gang's headless Service"}]}}
    binding = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
               "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "ckpt-operator"}},
               "spec": {"policyName": name, "validationActions": ["Deny"]}}
    return [policy, binding]


def render_validation() -> str:
    header = "# Generated by hack/gen-crd.py from operator/ckpt_operator/crd.py. Do not edit.\n"
    return header + yaml.safe_dump_all(validation_policy(), sort_keys=False, width=120)


def render() -> str:
    header = "# Generated by hack/gen-crd.py from operator/ckpt_operator/models.py. Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)
