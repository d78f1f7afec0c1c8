"""`transfer-audit [overrides]`: is the data sound? Same overrides as `transfer-train`.

Near-duplicate images across train/val/test (leakage) and within train, likely label errors and
class counts, from the pretrained body's cached features (one pass; none with a warm cache).
Writes `audit.json` and `audit.html` to the run directory (outputs/audit/runs/<time>/).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from transfer_cases.commands.cli import console, friendly_errors, run_hydra
from transfer_cases.reporting.audit_run import AUDIT_HTML, AUDIT_JSON, audit_from_config, summary_line
from transfer_cases.utils.checks import check_shared_settings
from transfer_cases.utils.paths import config_dir


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="audit")
@friendly_errors
def _main(cfg: DictConfig) -> None:
    check_shared_settings(cfg)  # the keys audit.yaml shares with train.yaml
    out = cfg.paths.output_dir
    result = audit_from_config(cfg, out)
    console.print(summary_line(result), highlight=False, soft_wrap=True)
    for line in result["warnings"]:
        console.print(line, style="yellow", highlight=False, soft_wrap=True)
    console.print(
        f"audit in {out}/{AUDIT_JSON}, thumbnails in {out}/{AUDIT_HTML}", highlight=False, soft_wrap=True
    )


def main() -> None:
    run_hydra(_main)


if __name__ == "__main__":
    main()
