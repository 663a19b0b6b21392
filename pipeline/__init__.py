"""uap-cxr: universal adversarial perturbations against chest X-ray classifiers (`python -m pipeline`)."""
from pathlib import Path

CONF = Path(__file__).resolve().parents[1] / "conf"  # the Hydra config tree every entry point composes
