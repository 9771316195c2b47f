"""The quality harness shared by both testbeds: every merge method, scored on real tasks.

A *testbed* (`benchmarks/testbed`: a tiny Llama on synthetic tasks, fast enough for CI;
`benchmarks/llm_testbed`: SmolLM2-135M on 5 applications x 8 languages of real words) gives
a `Testbed` spec: where its collections of PEFT LoRAs are, how a task is scored with a set
of (merged) LoRA factors, and how activation statistics are collected. The harness does the
rest, through the package's own code paths (`hydraopt_jax.io` reads the adapters,
`merge_adapters` / `plan_budget` / `baselines.run_baseline` merge them):

* `collection.py`: a collection read through `hydraopt_jax.io`;
* `methods.py`: the method grid (named plans, the planner, nested ranks, per-task
  truncation, every baseline) and `merge_method`;
* `run.py`: `evaluate_collection`: merge, score, rows and details, resumable;
* `analysis.py`: the HydraOpt front, the front check against baselines *and* per-task
  truncation, the summary numbers;
* `report.py`: result files, the markdown tables and the chart.

Score = mean over tasks of merged accuracy / own-LoRA accuracy (the paper family's
metric); storage = stored parameters / the original adapters' parameters.
"""
