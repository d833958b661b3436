"""``pdserve tune``: a discrete-event simulation of a deployment, calibrated by a cost
profile, and a search over deployments of N GPUs for the best predicted goodput (see
docs/architecture.md, "pdserve tune")."""
