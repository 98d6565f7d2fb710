"""Experiments built on the stages: ablation suites (`ablate`, `suites`), their reports and figures
(`report`, `figures`), and the offline demo (`demo`)."""
