"""`stowage pseudonyms`: a project's pseudonym table, for an authorised operator to
re-identify (it is as sensitive as the originals; docs/deidentification.md)."""
from __future__ import annotations

import csv
import sys

import click

from stowage.cli.options import common, load


@click.command()
@common
@click.option("--project", required=True, help="A [projects.NAME] of the configuration.")
@click.option("--studies", is_flag=True, help="Study Instance UIDs (original, new) instead of patients.")
def pseudonyms(config_file, data_dir, project, studies) -> None:
    """Print a project's pseudonym table as CSV: pseudonym, original patient ID and name, date offset."""
    from stowage.engine.deidentify.pseudonyms import PseudonymTable
    config = load(config_file, data_dir=data_dir)
    if project not in config.projects:
        raise click.ClickException(f"no [projects.{project}] in the configuration")
    path = config.data_dir / "projects" / project / "pseudonyms.sqlite"
    if not path.exists():
        raise click.ClickException(f"project {project} has de-identified nothing yet (no {path})")
    table = PseudonymTable(path)
    try:
        out = csv.writer(sys.stdout)
        if studies:
            out.writerow(["pseudonym", "original_study_instance_uid", "study_instance_uid"])
            out.writerows(table.studies())
        else:
            out.writerow(["pseudonym", "patient_id", "patient_name", "date_offset_days"])
            out.writerows(table.patients())
    finally:
        table.close()
