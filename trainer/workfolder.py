"""The self-training work folder's names, in one place for the schedule (:mod:`.selftrain`) and its report.

See :mod:`pocketseg.trainer.selftrain` for what each file holds.
"""

SETTINGS_NAME = "selftrain.json"
PLAN_NAME = "plan.json"
UNCERTAINTY_NAME = "uncertainty.json"
SELECTION_NAME = "selection.json"
JOURNAL_NAME = "journal.jsonl"
STEPS_DIR = "steps"
LOCK_NAME = ".lock"
#: File ending of the pseudo-label maps of a round (round<r>/pseudo/CASE.nii.gz).
PSEUDO_ENDING = ".nii.gz"
#: Sub-folders of the work folder: the ROI run, and the final training.
ROI_RUN = "roi"
FINAL = "final"
