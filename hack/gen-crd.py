"""Writes the generated TrainingJob CRD to crds/ and charts/ckpt-operator/crds/ (`make crd`)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = [ROOT / "crds" / "trainingjobs.ckpt.dev.yaml",
           ROOT / "charts" / "ckpt-operator" / "crds" / "trainingjobs.ckpt.dev.yaml"]
# spec.workers' validation (a ValidatingAdmissionPolicy), installed with the CRD (Helm installs crds/ first)
VALIDATION = [ROOT / "crds" / "trainingjobs.ckpt.dev-validation.yaml",
              ROOT / "charts" / "ckpt-operator" / "crds" / "trainingjobs.ckpt.dev-validation.yaml"]


def main() -> int:
    sys.path.insert(0, str(ROOT / "operator"))
    from ckpt_operator.crd import render, render_validation

    for targets, text in ((TARGETS, render()), (VALIDATION, render_validation())):
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            print(f"wrote {target.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
