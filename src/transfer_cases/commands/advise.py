"""`transfer-advise [overrides]`: which case for my data? Same overrides as `transfer-train`.

Prints the evidence per stage, the reasoning and the exact `transfer-train` command; writes
`advice.json` and `advice.png` to the run directory (outputs/advise/runs/<time>/).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from transfer_cases.advise.advisor import advise_from_config
from transfer_cases.advise.report import print_advice, user_overrides, write_advice
from transfer_cases.commands.cli import console, friendly_errors, run_hydra
from transfer_cases.reporting.audit_run import audit_if_configured
from transfer_cases.utils.checks import check_shared_settings
from transfer_cases.utils.paths import config_dir


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="advise")
@friendly_errors
def _main(cfg: DictConfig) -> None:
    check_shared_settings(cfg)  # the keys advise.yaml shares with train.yaml
    advice, timings = advise_from_config(cfg)
    extra = user_overrides()
    print_advice(advice, extra, console=console)
    paths = write_advice(advice, cfg.paths.output_dir, extra_overrides=extra, timings=timings)
    audit_if_configured(cfg, cfg.paths.output_dir)  # the data audit, when the config has the group
    console.print(
        f"\n{timings['images']:.0f} images, {timings['total_s']:.1f} s; "
        f"advice in {paths['json']}, chart in {paths['chart']}",
        soft_wrap=True,
    )


def main() -> None:
    run_hydra(_main)


if __name__ == "__main__":
    main()
