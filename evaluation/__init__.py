"""pocketseg.evaluation: FLARE 2023 DSC/NSD metrics and pocketseg evaluate."""
